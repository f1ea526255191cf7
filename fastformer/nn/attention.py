"""fastformer.nn.MultiheadAttention: torch.nn.MultiheadAttention on fastformer's attention op.

Masks follow torch.nn's conventions, which are the opposite of scaled_dot_product_attention's
for booleans: a True in attn_mask or key_padding_mask means "do not attend", a float mask is
added to the scores. Both are merged here into one mask for the op:

- boolean masks (or one boolean, one absent) become one boolean keep-mask,
  keep = ~attn_mask & ~key_padding_mask, broadcast by strides where it can be;
- as soon as one mask is float, booleans become 0 / -inf in the query's dtype and the two
  are added, as torch.nn does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..ops import _checks, scaled_dot_product_attention

__all__ = ["MultiheadAttention"]


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.nn's canonical form of a mask: booleans become 0 (keep) / -inf (masked)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _check_mask_dtype(name: str, mask: Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


def merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """One scaled_dot_product_attention mask, broadcastable to (batch, heads, length, source),
    from torch.nn's attn_mask ((L, S) or (batch * heads, L, S); True = masked, float = added)
    and key_padding_mask ((batch, S); True = padding, float = added). None when both are."""
    _check_mask_dtype("attn_mask", attn_mask)
    _check_mask_dtype("key_padding_mask", key_padding_mask)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (length, source):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(length, source)}."
                )
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (batch * heads, length, source):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(batch * heads, length, source)}."
                )
            attn_mask = attn_mask.view(batch, heads, length, source)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, source):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(batch, source)}, but got "
                f"{key_padding_mask.shape}"
            )
        # (B, S) -> (B, 1, 1, S): broadcast over heads and queries by strides.
        key_padding_mask = key_padding_mask.view(batch, 1, 1, source)
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        masked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~masked  # scaled_dot_product_attention keeps True
    floats = [_float_mask(m, dtype) for m in masks]
    return floats[0] if len(floats) == 1 else floats[0] + floats[1]


def _heads(x: Tensor, heads: int, batch_first: bool) -> Tensor:
    """(B, L, H * D) or (L, B, H * D) -> (B, H, L, D), a view."""
    if not batch_first:
        x = x.transpose(0, 1)
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class MultiheadAttention(torch.nn.Module):
    """torch.nn.MultiheadAttention with fastformer.scaled_dot_product_attention inside.

    The same constructor arguments, forward arguments, attributes and state_dict keys as
    torch.nn.MultiheadAttention (in_proj_weight / in_proj_bias packed as there, or
    q_proj_weight / k_proj_weight / v_proj_weight when kdim or vdim differs from
    embed_dim; out_proj a NonDynamicallyQuantizableLinear), so
    `load_state_dict(torch_mha.state_dict())` works both ways and gives torch's results.

    Paths:

    - need_weights=False (what torch.nn's Transformer layers pass): input projection, then
      fastformer's fused attention with attn_mask and key_padding_mask merged into one mask
      (booleans stay booleans; see this module's docstring), then the output projection.
      An is_causal=True hint (which, as in torch, needs attn_mask) runs the causal kernel
      without reading the mask when no key_padding_mask is given.
    - need_weights=True (torch's default) returns the attention weights, so it runs the
      reference path, torch.nn.functional.multi_head_attention_forward, which materializes
      them; pass need_weights=False for speed.
    - add_bias_kv=True or add_zero_attn=True also run that reference path (they append a
      key/value position that the fused path does not model); a warning says so once.

    Differences from torch.nn: NestedTensor inputs are not accepted (torch takes them only
    on its inference fast path). A query row whose keys are all masked gets zeros from the
    attention, as from torch's scaled_dot_product_attention (the need_weights=True path
    gives NaN there, as torch.nn does).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads} instead"
            )
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
        ):
            _checks.check_bool("MultiheadAttention", name, flag)
        # [0, 1], as scaled_dot_product_attention takes (and torch's module).
        dropout = _checks.check_probability(
            "MultiheadAttention", "dropout", dropout, allow_one=True
        )
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            # AssertionError, as torch.nn.MultiheadAttention raises.
            raise AssertionError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
                f"num_heads={num_heads}"
            )
        Parameter = torch.nn.Parameter
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias, **factory)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch.nn.MultiheadAttention's initialization."""
        if self._qkv_same_embed_dim:
            torch.nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            torch.nn.init.xavier_uniform_(self.q_proj_weight)
            torch.nn.init.xavier_uniform_(self.k_proj_weight)
            torch.nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            torch.nn.init.constant_(self.in_proj_bias, 0.0)
            torch.nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            torch.nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            torch.nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """A MultiheadAttention sharing `module`'s Parameters and out_proj (not copies)."""
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",
        )
        for name in new._parameters:
            setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        new.training = module.training
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """torch.nn.MultiheadAttention.forward: (attn_output, attn_weights or None).

        query (L, N, E) / (N, L, E) with batch_first / (L, E) unbatched; key and value
        likewise with S positions. key_padding_mask (N, S), attn_mask (L, S) or
        (N * num_heads, L, S): True = not allowed, float = added to the scores. The
        weights come only with need_weights=True, through the reference path (see the
        class docstring); averaged over heads unless average_attn_weights=False.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError(
                "fastformer.nn.MultiheadAttention does not take NestedTensor inputs; pass "
                "padded tensors and a key_padding_mask"
            )
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            if self.bias_k is not None or self.add_zero_attn:
                _warn_reference_path_once()
            return self._reference_forward(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        batched = query.dim() == 3
        if not batched:
            if query.dim() != 2 or key.dim() != 2 or value.dim() != 2:
                raise AssertionError(
                    "query, key and value must be all 3-D (batched) or all 2-D (unbatched), "
                    f"got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
                )
            # (L, E) -> (L, 1, E): one batch in the sequence-first layout.
            query, key, value = query[:, None], key[:, None], value[:, None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        batch_first = self.batch_first and batched
        seq_dim = 1 if batch_first else 0
        batch, length, source = query.shape[1 - seq_dim], query.shape[seq_dim], key.shape[seq_dim]
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]} "
                f"(query of shape {list(query.shape)})"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                f"{value.shape[:-1]}"
            )

        q, k, v = self._in_projection(query, key, value)
        heads = self.num_heads
        q, k, v = (_heads(t, heads, batch_first) for t in (q, k, v))  # (B, H, L or S, D)
        if is_causal and key_padding_mask is None:
            # torch.nn trusts the hint: attn_mask is the causal mask and need not be read.
            mask = None
        else:
            is_causal = False
            # In the projections' dtype (autocast may have changed it), as the op wants.
            mask = merge_masks(attn_mask, key_padding_mask, batch, heads, length, source, q.dtype)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, L, D)
        # Back to the caller's layout, heads concatenated: (B, L, E) or (L, B, E).
        out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out[:, 0]), None

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """q, k, v projections in the inputs' layout, as torch.nn computes them: one GEMM
        with the packed weight for self-attention, two when key is value."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            biases = [None] * 3 if bias is None else bias.chunk(3)
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return [
                F.linear(x, w, b)
                for x, w, b in zip((query, key, value), weights, biases, strict=True)
            ]
        weight = self.in_proj_weight
        if query is key and key is value:
            return list(F.linear(query, weight, bias).chunk(3, dim=-1))
        b_q, b_kv = (None, None) if bias is None else (bias[:embed], bias[embed:])
        if key is value:
            q = F.linear(query, weight[:embed], b_q)
            return [q, *F.linear(key, weight[embed:], b_kv).chunk(2, dim=-1)]
        biases = [None] * 3 if bias is None else bias.chunk(3)
        return [
            F.linear(x, w, b)
            for x, w, b in zip((query, key, value), weight.chunk(3), biases, strict=True)
        ]

    def _reference_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """torch.nn.functional.multi_head_attention_forward with this module's parameters."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights


_warned_reference_path = False


def _warn_reference_path_once() -> None:
    global _warned_reference_path
    if not _warned_reference_path:
        _warned_reference_path = True
        warnings.warn(
            "fastformer.nn.MultiheadAttention: add_bias_kv / add_zero_attn run the reference "
            "path (torch.nn.functional.multi_head_attention_forward), not the fused attention",
            stacklevel=3,
        )
