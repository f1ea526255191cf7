"""Attention and the encoder / decoder layers of the Seq2SeqTransformer.

Each layer passes on a pair (x, residual) rather than one tensor, so that every residual add
is fused into the LayerNorm that follows it (fastformer.layer_norm_residual):

    pre-norm  (norm_first):  normed, residual = LN(dropout(x) + residual); x = f(normed)
              x is the last sub-layer's output, not yet added to the residual stream; the
              next layer's first norm (or the stack's final norm) adds it.
    post-norm:               x = LN(dropout(f(x)) + x); residual is None.

The functions that do the maths come from a Kernels row (models/backend.py), so the same
parameters run on fastformer's ops, torch's, or the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..nn import FeedForward, LayerNorm
from .backend import Kernels
from .cache import KVCache, LayerCache
from .config import Seq2SeqConfig

__all__ = ["CrossAttention", "DecoderLayer", "EncoderLayer", "SelfAttention"]


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    batch, length, width = x.shape
    # (B, L, H * Dh) -> (B, L, H, Dh) -> (B, H, L, Dh)
    return x.view(batch, length, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape
    # (B, H, L, Dh) -> (B, L, H, Dh) -> (B, L, H * Dh)
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and an optional KV cache."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(
        self,
        x: Tensor,
        kernels: Kernels,
        *,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D). attn_mask broadcasts to (B, H, L, S), True = attend.
        causal: position i sees positions <= i, counting the cache's positions first."""
        if causal and attn_mask is not None:
            raise ValueError("SelfAttention: pass attn_mask or causal, not both")
        # (B, L, 3 * D) -> three (B, L, D) -> (B, H, L, Dh) each
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, H, past + L, Dh)
        is_causal = causal and past == 0
        length = q.shape[-2]
        if causal and past > 0 and length > 1:
            # New queries past + i see keys j <= past + i: a causal mask aligned bottom-right.
            visible = torch.ones(length, past + length, dtype=torch.bool, device=x.device)
            attn_mask = visible.tril(past)  # (L, past + L)
        # A single new query with a cache sees every key so far: no mask at all.
        dropout_p = self.dropout if self.training else 0.0
        out = kernels.attention(q, k, v, attn_mask, dropout_p, is_causal)  # (B, H, L, Dh)
        return self.out(merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head attention of the decoder over the encoder output (the memory)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.q = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the memory (B, S, D): (B, H, S, Dh) each."""
        k, v = self.kv(memory).chunk(2, dim=-1)  # (B, S, D) each
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def forward(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        memory_mask: Tensor | None,
        kernels: Kernels,
    ) -> Tensor:
        """x (B, L, D) attends over memory_kv from project_memory; memory_mask (B, 1, 1, S)
        is True at real (non-padding) source positions."""
        q = split_heads(self.q(x), self.n_heads)  # (B, H, L, Dh)
        k, v = memory_kv
        dropout_p = self.dropout if self.training else 0.0
        out = kernels.attention(q, k, v, memory_mask, dropout_p, False)  # (B, H, L, Dh)
        return self.out(merge_heads(out))


def _norm(config: Seq2SeqConfig) -> LayerNorm:
    # The norm's dropout is the residual dropout: it drops the sub-layer output it adds.
    return LayerNorm(config.d_model, eps=config.norm_eps, dropout=config.dropout)


def _feed_forward(config: Seq2SeqConfig) -> FeedForward:
    return FeedForward(
        config.d_model,
        config.dim_feedforward,
        activation=config.activation,
        dropout=config.dropout,
        bias=config.bias,
    )


class _Layer(nn.Module):
    norm_first: bool

    def _sublayer(
        self,
        norm: LayerNorm,
        f: Callable[[Tensor], Tensor],
        x: Tensor,
        residual: Tensor | None,
        kernels: Kernels,
    ) -> tuple[Tensor, Tensor | None]:
        """One residual sub-layer f with its norm, on and to the (x, residual) pair."""
        if self.norm_first:
            # residual <- dropout(x) + residual; f's output stays pending for the next norm.
            normed, residual = kernels.residual_norm(norm, x, residual)
            return f(normed), residual
        # x <- LN(dropout(f(x)) + x)
        return kernels.residual_norm(norm, f(x), x)[0], None


class EncoderLayer(_Layer):
    """Self-attention over the source, then the feed-forward."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = SelfAttention(config)
        self.norm1 = _norm(config)
        self.feed_forward = _feed_forward(config)
        self.norm2 = _norm(config)

    def forward(
        self, x: Tensor, residual: Tensor | None, src_mask: Tensor | None, kernels: Kernels
    ) -> tuple[Tensor, Tensor | None]:
        """(x, residual) (B, S, D) each -> the same; src_mask (B, 1, 1, S), True = token."""
        x, residual = self._sublayer(
            self.norm1,
            lambda t: self.self_attn(t, kernels, attn_mask=src_mask),
            x,
            residual,
            kernels,
        )
        return self._sublayer(
            self.norm2, lambda t: kernels.feed_forward(self.feed_forward, t), x, residual, kernels
        )


class DecoderLayer(_Layer):
    """Causal self-attention (with an optional KV cache), cross-attention over the encoder
    output, then the feed-forward."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = SelfAttention(config)
        self.norm1 = _norm(config)
        self.cross_attn = CrossAttention(config)
        self.norm2 = _norm(config)
        self.feed_forward = _feed_forward(config)
        self.norm3 = _norm(config)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        kernels: Kernels,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(x, residual) (B, L, D) each -> the same. memory (B, S, D): the encoder output,
        unused when a cache holds its keys and values; memory_mask (B, 1, 1, S)."""
        if cache is not None:
            self_cache, memory_kv = cache.self_attention, cache.cross_attention
        elif memory is not None:
            self_cache, memory_kv = None, self.cross_attn.project_memory(memory)
        else:
            raise ValueError("DecoderLayer: pass the encoder output or a cache")
        x, residual = self._sublayer(
            self.norm1,
            lambda t: self.self_attn(t, kernels, causal=True, cache=self_cache),
            x,
            residual,
            kernels,
        )
        x, residual = self._sublayer(
            self.norm2,
            lambda t: self.cross_attn(t, memory_kv, memory_mask, kernels),
            x,
            residual,
            kernels,
        )
        return self._sublayer(
            self.norm3, lambda t: kernels.feed_forward(self.feed_forward, t), x, residual, kernels
        )
