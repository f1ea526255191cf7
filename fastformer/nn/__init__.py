"""Modules built on fastformer's ops, drop-in replacements for their torch.nn namesakes."""

from .attention import MultiheadAttention
from .convert import ConversionReport, ConversionWarning, convert
from .feed_forward import FeedForward, activation_name
from .norm import LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "ConversionReport",
    "ConversionWarning",
    "FeedForward",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "activation_name",
    "convert",
]
