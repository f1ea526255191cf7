"""Seq2SeqConfig: the hyperparameters of fastformer's encoder-decoder Transformer."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

from ..ops.feed_forward import ACTIVATIONS


class Bound(NamedTuple):
    """The allowed values of a numeric setting: an integer, or a finite number, in a range.

    One check for the configs (Seq2SeqConfig, models/train.py's TrainConfig) and the command
    line's option types, so that both say the same."""

    low: float
    high: float = math.inf
    integer: bool = True
    low_open: bool = False  # the value must exceed low, not merely reach it
    high_open: bool = False

    def describe(self) -> str:
        """What is expected, e.g. "an integer >= 1" or "a finite number in [0, 1)"."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = (int(v) if float(v).is_integer() else v for v in (self.low, self.high))
        if self.high == math.inf:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{low}, {high}{right}"

    def accepts(self, value: object) -> bool:
        # bool is an int to Python, but True as a layer count is a mistake; NaN fails every
        # comparison below, so it is never accepted.
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        value = float(value)
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def check(self, owner: str, name: str, value: object) -> None:
        """Raise ValueError "<owner>: <name> must be <describe()>, got <value>"."""
        if not self.accepts(value):
            raise ValueError(f"{owner}: {name} must be {self.describe()}, got {value!r}")


# Seq2SeqConfig's numeric fields. A decoder needs a layer: its layers hold the
# cross-attention, the only path from the source to the output; the encoder may have none
# (the decoder then attends over the source's embeddings).
FIELD_BOUNDS: dict[str, Bound] = {
    "vocab_size": Bound(1),
    "d_model": Bound(1),
    "n_heads": Bound(1),
    "n_encoder_layers": Bound(0),
    "n_decoder_layers": Bound(1),
    "dim_feedforward": Bound(1),
    "dropout": Bound(0, 1, integer=False, high_open=True),
    "max_len": Bound(1),
    "norm_eps": Bound(0, integer=False, low_open=True),
    "pad_id": Bound(0),
    "bos_id": Bound(0),
    "eos_id": Bound(0),
    "init_std": Bound(0, integer=False),
}


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
        for name, bound in FIELD_BOUNDS.items():
            bound.check("Seq2SeqConfig", name, getattr(self, name))
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Seq2SeqConfig: activation must be one of {list(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Seq2SeqConfig: d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if value >= self.vocab_size:
                raise ValueError(
                    f"Seq2SeqConfig: {name} ({value}) must be a token id below "
                    f"vocab_size ({self.vocab_size})"
                )
        # generate() pads finished rows and the loss ignores padding: one id for two roles
        # would end every row at once, or never teach the model to stop.
        if len(set(ids.values())) < len(ids):
            raise ValueError(f"Seq2SeqConfig: pad_id, bos_id and eos_id must differ, got {ids}")

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
