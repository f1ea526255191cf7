"""fastformer.convert: swap a model's torch.nn Transformer modules for fastformer's, in place."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.utils.parametrize

from .attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

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
_LAYERS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
_ATTENTIONS = (torch.nn.MultiheadAttention, MultiheadAttention)
_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, LayerNorm, RMSNorm)
# The children of a torch.nn Transformer layer that fastformer's layer reads (weights, eps,
# p) rather than calls, or replaces, and the classes it can do that for: exactly these
# (fastformer's own modules where a user already swapped one in), no subclass.
_LAYER_CHILDREN: dict[str, tuple[type, ...]] = {
    "self_attn": _ATTENTIONS,
    "multihead_attn": _ATTENTIONS,
    "linear1": (torch.nn.Linear,),
    "linear2": (torch.nn.Linear,),
    "dropout": (torch.nn.Dropout,),
    "dropout1": (torch.nn.Dropout,),
    "dropout2": (torch.nn.Dropout,),
    "dropout3": (torch.nn.Dropout,),
    "norm1": _NORMS,
    "norm2": _NORMS,
    "norm3": _NORMS,
}
_HOOK_KINDS = (
    ("_forward_pre_hooks", "forward pre-hooks"),
    ("_forward_hooks", "forward hooks"),
    ("_backward_pre_hooks", "backward pre-hooks"),
    ("_backward_hooks", "backward hooks"),
)


def _public_name(cls: type) -> str:
    return f"{'torch' if cls.__module__.startswith('torch.') else 'fastformer'}.nn.{cls.__name__}"


def _hooks(module: torch.nn.Module) -> str:
    """The hooks registered on `module`, by kind and name ("forward pre-hooks (WeightNorm)":
    the old weight_norm / spectral_norm are hooks), or "" if none."""
    kinds = []
    for attribute, kind in _HOOK_KINDS:
        hooks = getattr(module, attribute)
        if hooks:
            names = (getattr(h, "__name__", type(h).__name__) for h in hooks.values())
            kinds.append(f"{kind} ({', '.join(names)})")
    return ", ".join(kinds)


def _why_not(module: torch.nn.Module) -> str:
    """Why `module`, a torch.nn class convert knows (or a subclass), stays: "" if it can go.

    A layer is checked with everything under it: fastformer's layer reads its linear, norm
    and dropout children's attributes, so a hook, a parametrization or a subclass there
    would no longer run. The stacks call their children, and MultiheadAttention reads
    out_proj's weight as torch's does: only the module itself counts for them.
    """
    torch_class = next(cls for cls in _CONVERTERS if isinstance(module, cls))
    is_layer = isinstance(module, _LAYERS)
    for sub_name, sub in module.named_modules() if is_layer else [("", module)]:
        where = f"{sub_name} " if sub_name else ""
        # Before the class check: a parametrized module's class is a generated subclass.
        if torch.nn.utils.parametrize.is_parametrized(sub):
            return (
                f"{where}has parametrizations (computed weights the fused path would not compute)"
            )
        hooks = _hooks(sub)
        if hooks:
            return f"{where}has {hooks}, which the fused path would not run"
    if type(module) is not torch_class:
        return (
            f"{type(module).__qualname__} subclasses torch.nn.{torch_class.__name__} "
            "(its forward may differ)"
        )
    if isinstance(module, torch.nn.MultiheadAttention) and (
        module.bias_k is not None or module.add_zero_attn
    ):
        return "add_bias_kv / add_zero_attn have no fused path"
    if is_layer:
        for name, classes in _LAYER_CHILDREN.items():
            child = module._modules.get(name)
            if child is not None and type(child) not in classes:
                names = [_public_name(cls) for cls in classes]
                expected = " or ".join([", ".join(names[:-1]), names[-1]] if names[1:] else names)
                return (
                    f"{name} is a {type(child).__qualname__}, not exactly {expected} (its "
                    "forward may differ)"
                )
    return ""


def convert(
    model: torch.nn.Module, *, return_report: bool = False
) -> torch.nn.Module | tuple[torch.nn.Module, ConversionReport]:
    """Replace, in place and recursively, the torch.nn Transformer modules of `model`
    (Transformer, TransformerEncoder / Decoder and their layers, MultiheadAttention,
    LayerNorm, RMSNorm) with fastformer.nn's, keeping the same Parameter objects (shared,
    not copied: an optimizer built before conversion still holds them) and each module's
    training mode.

    Only modules whose behaviour the replacement keeps are replaced. Left alone, with a
    ConversionWarning that lists them and why: subclasses (their forward may differ),
    modules with hooks or parametrizations (for a Transformer layer, on it or on anything
    under it), layers with a child of another class than torch.nn's (a LoRA linear, a
    custom norm), MultiheadAttention with add_bias_kv / add_zero_attn, and modules whose
    replacement cannot be built (an argument fastformer rejects). Their convertible
    submodules are still converted. A layer with an activation the fused feed-forward lacks
    is converted and runs its feed-forward in plain PyTorch (a note in the report).

    Every replacement is built before the first is swapped in, so a module is either
    replaced or left whole, and an error never leaves a half-converted model.

    Returns the model, or (model, ConversionReport) with return_report=True. When `model`
    itself is one of the classes above, the returned model is its replacement.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    replacements: dict[int, torch.nn.Module] = {}  # id(old) -> new
    edges: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []  # (parent, name, child)
    visited: set[int] = set()  # modules shared in the tree are decided once

    def plan(module: torch.nn.Module, name: str) -> None:
        """Decide, children first, and build the replacements; change nothing."""
        if id(module) in visited:
            return
        visited.add(id(module))
        for child_name, child in module._modules.items():  # every name of a shared child
            if child is not None:
                edges.append((module, child_name, child))
                plan(child, f"{name}.{child_name}" if name else child_name)
        if not isinstance(module, tuple(_CONVERTERS)):
            return
        why = _why_not(module)
        if not why:
            try:
                new = _CONVERTERS[type(module)](module)
            except Exception as error:  # left whole and reported, whatever the cause
                why = f"cannot be converted: {type(error).__name__}: {error}"
        if why:
            report.skipped.append((name, why))
            return
        replacements[id(module)] = new
        report.converted.append((name, type(module).__name__))
        if getattr(new, "fused_activation", "") is None:
            report.notes.append(
                (name, f"activation {new.activation!r}: feed-forward runs plain PyTorch")
            )

    plan(model, "")
    # Only assignments from here. Each parent (its replacement, if it has one) gets its
    # children's replacements, or the originals back where a replacement took its own (a
    # layer's from_torch converts its attention and norms, even one left alone here).
    for parent, child_name, child in edges:
        target = replacements.get(id(parent), parent)
        final = replacements.get(id(child), child)
        # Compared first: setattr of a module would drop the function a torch decoder
        # layer keeps in its instance dict over its activation module.
        if target._modules.get(child_name) is not final:
            setattr(target, child_name, final)
    if report.skipped:
        warnings.warn(f"fastformer.convert: {report}", ConversionWarning, stacklevel=2)
    model = replacements.get(id(model), model)
    return (model, report) if return_report else model
