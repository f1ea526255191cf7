"""Hugging Face transformers 5.x: "fastformer" as an attention implementation.

    fastformer.enable_transformers()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastformer")
    model.set_attn_implementation("fastformer")  # or switch a built model

enable_transformers() registers two functions with transformers, under the name "fastformer":

- AttentionInterface.register: `attention_forward` below. Every model whose attention layers
  look their function up in ALL_ATTENTION_FUNCTIONS (Llama, Qwen2, GPT-2, BERT, BART, T5...)
  calls it with q (B, Hq, L, D), k and v (B, Hkv, S, D), the mask, dropout, scaling and the
  model's extra keyword arguments, and expects (out (B, L, Hq, Dv), weights or None).
- AttentionMaskInterface.register: transformers' own `sdpa_mask`, so that models build for
  "fastformer" the masks they build for "sdpa": boolean (B, 1, L, S), True where a query
  attends, or None where no mask is needed (no padding) or where `is_causal` covers it. An
  implementation without a mask function would get no mask at all (padding ignored).

attention_forward follows transformers' sdpa_attention_forward: `is_causal` (upper-left) only
for a causal layer with more than one query and no mask; T5's relative position bias
(`position_bias`) merged into a float additive mask; grouped key/value heads passed as they
are with enable_gqa (never repeated). fastformer.scaled_dot_product_attention then runs the
Triton kernel on GPUs (on CPU: its C++ kernels, or the Triton interpreter inside
fastformer.triton_on_cpu()), and itself hands calls its kernel cannot take (e.g. a float mask
that requires grad, as T5's position bias does in training) to torch's function, counted.

Calls that need what an SDPA does not compute run the model's own eager attention instead,
counted in fastformer.info()["fallback_calls"]["transformers_attention"] and warned about once:
output_attentions=True (the attention weights) and attention sinks (`s_aux`, gpt-oss). The
boolean mask becomes eager's additive one for them. Logit soft-capping (`softcap`, Gemma 2)
runs in fastformer's kernels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from .. import backend
from ..ops.attention import scaled_dot_product_attention, softcapped_scaled_dot_product_attention

NAME = "fastformer"
# The key of fastformer.info()["fallback_calls"] for calls that run eager attention.
FALLBACK_OP = "transformers_attention"
MIN_TRANSFORMERS_MAJOR = 5


def enable_transformers() -> None:
    """Register "fastformer" as an attention implementation of Hugging Face transformers, for
    `attn_implementation="fastformer"` when building or loading a model and for
    `model.set_attn_implementation("fastformer")`. Safe to call more than once."""
    try:
        import transformers
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as error:
        raise ImportError(
            "fastformer.enable_transformers() needs Hugging Face transformers 5.x: "
            "pip install 'transformers>=5,<6'"
        ) from error
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise ImportError(
            "fastformer.enable_transformers() needs Hugging Face transformers 5.x, found "
            f"{transformers.__version__}: pip install 'transformers>=5,<6'"
        )
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention function: query (B, Hq, L, D), key and value (B, Hkv, S, D);
    attention_mask boolean (True: attend) or additive float, broadcasting to (B, Hq, L, S), or
    None. Returns (out (B, L, Hq, Dv) contiguous, None), or eager's (out, weights) for calls
    that need them (see the module's docstring)."""
    q_length = query.shape[2]
    # The layer's own flag unless the caller overrides it; a mask, when given, holds causality.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal

    reason = _eager_reason(kwargs)
    if reason:
        backend.note_fallback(FALLBACK_OP, reason)
        return _eager_attention(
            module, query, key, value, attention_mask, dropout, scaling, is_causal,
            position_bias, **kwargs,
        )  # fmt: skip

    if position_bias is not None:
        attention_mask = _merge_position_bias(position_bias, attention_mask, is_causal, key)
        is_causal = False
    arguments = {
        "attn_mask": attention_mask,
        "dropout_p": dropout,
        "is_causal": is_causal,
        "scale": scaling,
        "enable_gqa": key.shape[1] != query.shape[1],
    }
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma 2's logit soft-capping
        out = softcapped_scaled_dot_product_attention(
            query, key, value, **arguments, softcap=softcap
        )
    else:
        out = scaled_dot_product_attention(query, key, value, **arguments)
    # (B, Hq, L, Dv) -> (B, L, Hq, Dv), as the models reshape it to (B, L, Hq * Dv)
    return out.transpose(1, 2).contiguous(), None


def _eager_reason(kwargs: dict) -> str:
    """Why this call must run eager attention ("" when fastformer can run it)."""
    if kwargs.get("output_attentions", False):
        return "output_attentions=True needs the attention weights, which SDPA does not return"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux) are not supported"
    return ""


def _merge_position_bias(
    position_bias: Tensor, attention_mask: Tensor | None, is_causal: bool, key: Tensor
) -> Tensor:
    """One additive float mask: T5's position bias (B or 1, H, L, S) where a query attends,
    the dtype's minimum where it does not (as transformers' sdpa path builds it)."""
    masked = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        causal = _causal(position_bias.shape[-2], key.shape[-2], key.device)
        return torch.where(causal, position_bias, masked)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, masked)
    return position_bias + attention_mask


def _causal(q_length: int, kv_length: int, device: torch.device) -> Tensor:
    """(L, S) boolean, upper-left aligned as SDPA's is_causal: query i sees keys 0..i."""
    rows = torch.arange(q_length, device=device)[:, None]
    return rows >= torch.arange(kv_length, device=device)[None, :]


def _eager_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool,
    position_bias: Tensor | None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """The model's own eager attention (its module's eager_attention_forward, else a generic
    one), given the additive float mask eager expects instead of the boolean one."""
    if attention_mask is None and is_causal:
        attention_mask = _causal(query.shape[2], key.shape[2], query.device)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    if position_bias is not None:
        kwargs["position_bias"] = position_bias
    eager = _model_eager(module)
    return eager(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout=dropout,
        **kwargs,
    )


def _model_eager(module: torch.nn.Module) -> Callable:
    model_file = sys.modules.get(type(module).__module__)
    eager = getattr(model_file, "eager_attention_forward", None)
    return eager if callable(eager) else _generic_eager


def _generic_eager(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention for models whose file has no eager_attention_forward: weights
    softmax(q k^T * scaling [softcapped] + position_bias + mask [, sinks]), then weights @ v."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, Hq, S, D)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, Hq, L, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    if s_aux is not None:  # one learned sink logit per head, dropped after the softmax
        sinks = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sinks.to(scores.dtype)], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if s_aux is not None:
        weights = weights[..., :-1]
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, Hq, Dv)
    return out, weights
