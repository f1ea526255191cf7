"""fastformer.models: complete models built from fastformer.nn."""

from .backend import BACKENDS, active_backend, use_backend
from .cache import DecoderCache, KVCache, LayerCache
from .config import Seq2SeqConfig
from .seq2seq import Seq2SeqTransformer

__all__ = [
    "BACKENDS",
    "DecoderCache",
    "KVCache",
    "LayerCache",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "active_backend",
    "use_backend",
]
