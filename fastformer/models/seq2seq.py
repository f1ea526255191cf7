"""Seq2SeqTransformer: an encoder-decoder Transformer on fastformer's ops, with generate()."""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import LayerNorm
from .backend import Kernels, check_backend, get_kernels
from .cache import DecoderCache, KVCache, LayerCache
from .config import Bound, Seq2SeqConfig
from .layers import DecoderLayer, EncoderLayer

__all__ = ["Seq2SeqTransformer"]


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer: token embedding shared by encoder, decoder and output
    projection; learned positions; layers of fastformer.nn.LayerNorm / FeedForward.

    backend: "fastformer" (fused ops), "torch" or "reference"; see models/backend.py.
    gradient_checkpointing: recompute each layer in backward (torch.utils.checkpoint).
    """

    def __init__(self, config: Seq2SeqConfig, *, backend: str = "fastformer") -> None:
        super().__init__()
        self.config = config
        self.backend = check_backend(backend)
        self.gradient_checkpointing = False
        d_model = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d_model)
        self.src_pos = nn.Embedding(config.max_len, d_model)
        self.tgt_pos = nn.Embedding(config.max_len, d_model)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        # Pre-norm: the final norm adds the last sub-layer's (dropped-out) output to the
        # stream. Post-norm: its input is already a norm's output, so nothing to drop.
        final_dropout = config.dropout if config.norm_first else 0.0
        self.encoder_norm = LayerNorm(d_model, eps=config.norm_eps, dropout=final_dropout)
        self.decoder_norm = LayerNorm(d_model, eps=config.norm_eps, dropout=final_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) embeddings and linear weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, LayerNorm):
                module.reset_parameters()

    def set_backend(self, backend: str) -> Self:
        self.backend = check_backend(backend)
        return self

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    # ------------------------------------------------------------------------------------
    # Building blocks: masks, embeddings, the two stacks, the output projection
    # ------------------------------------------------------------------------------------

    def source_mask(self, src: Tensor) -> Tensor:
        """(B, 1, 1, S) boolean, True at the source's real (non-padding) tokens."""
        return (src != self.config.pad_id)[:, None, None, :]

    def _embed(self, tokens: Tensor, positions: nn.Embedding, start: int = 0) -> Tensor:
        length = tokens.shape[1]
        if start + length > self.config.max_len:
            raise ValueError(
                f"Seq2SeqTransformer: positions up to {start + length} exceed "
                f"max_len={self.config.max_len}"
            )
        index = torch.arange(start, start + length, device=tokens.device)
        x = self.embed(tokens) + positions(index)  # (B, L, D) + (L, D)
        if not self.config.norm_first:
            # Pre-norm blocks drop the embedding out in their first (fused) norm instead.
            x = F.dropout(x, self.config.dropout, self.training)
        return x

    def _run_layer(self, layer: nn.Module, *args: object) -> tuple[Tensor, Tensor | None]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _encode(self, src: Tensor, src_mask: Tensor, kernels: Kernels) -> Tensor:
        x, residual = self._embed(src, self.src_pos), None
        for layer in self.encoder:
            x, residual = self._run_layer(layer, x, residual, src_mask, kernels)
        return kernels.residual_norm(self.encoder_norm, x, residual)[0]

    def _decode(
        self,
        tgt: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor,
        kernels: Kernels,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        start = cache.length if cache is not None else 0
        x, residual = self._embed(tgt, self.tgt_pos, start), None
        for i, layer in enumerate(self.decoder):
            layer_cache = cache.layers[i] if cache is not None else None
            x, residual = self._run_layer(
                layer, x, residual, memory, memory_mask, kernels, layer_cache
            )
        return kernels.residual_norm(self.decoder_norm, x, residual)[0]

    def output_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., vocab): the projection tied to the token embedding."""
        return F.linear(hidden, self.embed.weight)

    def encode(self, src: Tensor) -> Tensor:
        """src (B, S) token ids -> the encoder output (B, S, D)."""
        return self._encode(src, self.source_mask(src), get_kernels(self.backend))

    def decode(
        self, tgt: Tensor, memory: Tensor | None, src: Tensor, cache: DecoderCache | None = None
    ) -> Tensor:
        """The decoder's final hidden states (B, L, D) for tgt (B, L), over the encoder output
        memory (B, S, D) of src (B, S). With a cache (make_cache), tgt holds only the tokens
        after those already cached (memory may be None), and the cache takes them in."""
        kernels = get_kernels(self.backend)
        return self._decode(tgt, memory, self.source_mask(src), kernels, cache)

    # ------------------------------------------------------------------------------------
    # Training: logits and loss
    # ------------------------------------------------------------------------------------

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), tgt (B, T) token ids -> logits (B, T, vocab); position t of tgt sees
        tgt[:, :t + 1] and every non-padding source token."""
        kernels = get_kernels(self.backend)
        src_mask = self.source_mask(src)
        memory = self._encode(src, src_mask, kernels)
        return self.output_logits(self._decode(tgt, memory, src_mask, kernels))

    def loss(self, src: Tensor, tgt: Tensor, *, normalizer: Tensor | float | None = None) -> Tensor:
        """Next-token cross-entropy for tgt (B, T) = BOS, tokens, EOS, padding.

        The sum over non-padding target tokens, divided by their count, or by `normalizer`
        when given (data-parallel training passes the global batch's count, so that the
        averaged gradients equal those of one process on the whole batch)."""
        logits = self(src, tgt[:, :-1])  # (B, T - 1, vocab)
        labels = tgt[:, 1:]  # (B, T - 1)
        total = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=self.config.pad_id,
            reduction="sum",
        )
        if normalizer is None:
            normalizer = (labels != self.config.pad_id).sum()
        return total / normalizer

    # ------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------

    def make_cache(self, memory: Tensor, capacity: int) -> DecoderCache:
        """An empty decoder cache for `capacity` positions, with the cross-attention keys and
        values of memory (B, S, D) projected once."""
        return DecoderCache(
            [
                LayerCache(KVCache(capacity), layer.cross_attn.project_memory(memory))
                for layer in self.decoder
            ]
        )

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decode from BOS for src (B, S): greedy, or sampling with temperature / top_k.

        Returns (B, N) token ids without the BOS, N <= max_new_tokens (default: max_len);
        each row ends with its EOS followed by padding, or is cut at N. Decoding stops once
        every row has its EOS. use_cache=False recomputes the decoder over the whole prefix
        at each step (same tokens, slower). Sampling draws from torch's generator (or
        `generator`), the same draws with and without the cache.

        Checked whether sampling or not (ValueError naming the argument): max_new_tokens an
        integer in [1, max_len]; temperature a finite number > 0; top_k None (every token)
        or an integer >= 1, where a top_k of vocab_size or more keeps every token.
        """
        config = self.config
        max_new_tokens = config.max_len if max_new_tokens is None else max_new_tokens
        Bound(1, config.max_len).check("generate", "max_new_tokens", max_new_tokens)
        Bound(0, integer=False, low_open=True).check("generate", "temperature", temperature)
        if top_k is not None:
            Bound(1).check("generate", "top_k", top_k)
        was_training = self.training
        self.eval()
        try:
            kernels = get_kernels(self.backend)
            src_mask = self.source_mask(src)
            memory = self._encode(src, src_mask, kernels)
            cache = self.make_cache(memory, max_new_tokens) if use_cache else None
            batch = src.shape[0]
            # (B, 1 + steps so far): BOS, then the generated tokens
            tokens = torch.full((batch, 1), config.bos_id, dtype=torch.long, device=src.device)
            finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
            for _ in range(max_new_tokens):
                if cache is not None:  # only the newest token; the cache holds the rest
                    hidden = self._decode(tokens[:, -1:], None, src_mask, kernels, cache)
                else:
                    hidden = self._decode(tokens, memory, src_mask, kernels)
                logits = self.output_logits(hidden[:, -1])  # (B, vocab)
                next_token = _pick(logits, do_sample, temperature, top_k, generator)
                next_token = next_token.masked_fill(finished, config.pad_id)
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                finished |= next_token == config.eos_id
                if bool(finished.all()):
                    break
            return tokens[:, 1:]
        finally:
            self.train(was_training)


def _pick(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The next token (B,) of logits (B, vocab): argmax, or a sample."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # The exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
