"""Seq2SeqConfig: the hyperparameters of fastformer's encoder-decoder Transformer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Seq2SeqConfig:
    """Sizes and options of a Seq2SeqTransformer.

    The encoder and decoder share one token embedding, which is also the output projection
    (tied weights); each has its own learned position embedding of max_len positions.
    norm_first=True is the pre-norm block (x + f(LN(x))), with one final LayerNorm after each
    stack; False is the post-norm block of the original Transformer (LN(x + f(x))).
    """

    vocab_size: int = 16
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    dim_feedforward: int = 512
    dropout: float = 0.0  # on embeddings, sub-layer outputs, attention weights, FF hidden
    activation: str = "gelu"  # any fastformer.feed_forward activation, "swiglu" included
    max_len: int = 64  # positions of the encoder's and of the decoder's embeddings
    norm_first: bool = True
    norm_eps: float = 1e-5
    bias: bool = True  # biases of the linear layers
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    init_std: float = 0.02  # normal init of embeddings and linear weights

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Seq2SeqConfig: d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig: dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"Seq2SeqConfig: {name} ({value}) must be a token id below "
                    f"vocab_size ({self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Seq2SeqConfig:
        """The config saved by to_dict (unknown keys are an error, missing ones default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Seq2SeqConfig: unknown fields {unknown}")
        return cls(**values)
