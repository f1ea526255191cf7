"""fastformer.convert: swap a model's torch.nn Transformer modules for fastformer's, in place."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch

from .attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .transformer_layer import has_hooks

__all__ = ["ConversionReport", "ConversionWarning", "convert"]


class ConversionWarning(UserWarning):
    """convert() left some torch.nn modules as they were."""


@dataclasses.dataclass
class ConversionReport:
    """What convert() did, by qualified module name ("" is the model itself).

    converted: (name, torch.nn class name) of each module replaced by fastformer's.
    skipped: (name, reason) of each module convert() recognized but left alone.
    notes: (name, note) where a converted module runs part of its work in plain PyTorch.
    """

    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s)"]
        lines += [f"  left alone: {name or '<model>'}: {why}" for name, why in self.skipped]
        lines += [f"  note: {name or '<model>'}: {note}" for name, note in self.notes]
        return "\n".join(lines)


# torch.nn class -> fastformer's from_torch, for the exact classes convert replaces.
_CONVERTERS: dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm.from_torch,
    torch.nn.RMSNorm: RMSNorm.from_torch,
    torch.nn.MultiheadAttention: MultiheadAttention.from_torch,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer.from_torch,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer.from_torch,
    torch.nn.TransformerEncoder: TransformerEncoder.from_torch,
    torch.nn.TransformerDecoder: TransformerDecoder.from_torch,
    torch.nn.Transformer: Transformer.from_torch,
}
_NORMS = ("norm1", "norm2", "norm3")


def _why_not(module: torch.nn.Module) -> str:
    """Why `module`, a torch.nn class convert knows (or a subclass), stays: "" if it can go."""
    torch_class = next(cls for cls in _CONVERTERS if isinstance(module, cls))
    if type(module) is not torch_class:
        return (
            f"{type(module).__qualname__} subclasses torch.nn.{torch_class.__name__} "
            "(its forward may differ)"
        )
    if has_hooks(module):
        return "has forward/backward hooks"
    if isinstance(module, torch.nn.MultiheadAttention) and (
        module.bias_k is not None or module.add_zero_attn
    ):
        return "add_bias_kv / add_zero_attn have no fused path"
    if isinstance(module, torch.nn.TransformerEncoderLayer | torch.nn.TransformerDecoderLayer):
        for name in _NORMS:
            norm = getattr(module, name, None)
            if norm is not None and not isinstance(norm, LayerNorm | torch.nn.LayerNorm):
                return f"{name} is a {type(norm).__qualname__}, not a LayerNorm"
    return ""


def convert(
    model: torch.nn.Module, *, return_report: bool = False
) -> torch.nn.Module | tuple[torch.nn.Module, ConversionReport]:
    """Replace, in place and recursively, the torch.nn Transformer modules of `model`
    (Transformer, TransformerEncoder / Decoder and their layers, MultiheadAttention,
    LayerNorm, RMSNorm) with fastformer.nn's, keeping the same Parameter objects (shared,
    not copied: an optimizer built before conversion still holds them) and each module's
    training mode.

    Only the exact torch.nn classes are replaced. Left alone, with a ConversionWarning that
    lists them: subclasses (their forward may differ), modules with hooks, MultiheadAttention
    with add_bias_kv / add_zero_attn, layers whose norms are not LayerNorms. Their
    convertible submodules are still converted. A layer with an activation the fused
    feed-forward lacks is converted and runs its feed-forward in plain PyTorch (a note in
    the report).

    Returns the model, or (model, ConversionReport) with return_report=True. When `model`
    itself is one of the classes above, the returned model is its replacement.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    done: dict[int, torch.nn.Module] = {}  # id(old) -> new, for modules shared in the tree

    def visit(module: torch.nn.Module, name: str) -> torch.nn.Module:
        if id(module) in done:
            return done[id(module)]
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        new = module
        if isinstance(module, tuple(_CONVERTERS)):
            why = _why_not(module)
            if why:
                report.skipped.append((name, why))
            else:
                new = _CONVERTERS[type(module)](module)
                report.converted.append((name, type(module).__name__))
                if getattr(new, "fused_activation", "") is None:
                    report.notes.append(
                        (name, f"activation {new.activation!r}: feed-forward runs plain PyTorch")
                    )
        done[id(module)] = new
        return new

    model = visit(model, "")
    if report.skipped:
        warnings.warn(f"fastformer.convert: {report}", ConversionWarning, stacklevel=2)
    return (model, report) if return_report else model
