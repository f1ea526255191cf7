"""fastformer/reference.py agrees with the torch functions whose semantics it defines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastformer import reference


def test_layer_norm_residual_is_eager_pytorch():
    x, residual = (
        torch.randn(4, 6, 33, dtype=torch.float64),
        torch.randn(4, 6, 33, dtype=torch.float64),
    )
    weight, bias = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    out, h = reference.layer_norm_residual(x, residual, weight, bias, eps=1e-6)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(out, F.layer_norm(x + residual, (33,), weight, bias, 1e-6))
    rms, _ = reference.layer_norm_residual(x, None, weight, rms_norm=True, eps=1e-6)
    torch.testing.assert_close(rms, F.rms_norm(x, (33,), weight, 1e-6))


def test_layer_norm_residual_dtypes():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out, h = reference.layer_norm_residual(x, residual_in_fp32=True)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    out, h = reference.layer_norm_residual(x, torch.randn(3, 8))
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_layer_norm_residual_dropout_mask():
    x = torch.randn(5, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) > 0.5
    _, h = reference.layer_norm_residual(x, dropout_p=0.5, dropout_mask=mask)
    torch.testing.assert_close(h, x * mask / 0.5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("lengths", [(5, 5), (3, 7), (7, 3)])
def test_attention_matches_torch_sdpa(mask_kind, lengths):
    length, source = lengths
    q = torch.randn(2, 3, length, 16, dtype=torch.float64)
    k = torch.randn(2, 3, source, 16, dtype=torch.float64)
    v = torch.randn(2, 3, source, 8, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(length, source) > 0.3
        mask[:, 0] = True  # torch's math kernel gives NaN for fully masked rows
    elif mask_kind == "float":
        mask = torch.randn(2, 1, length, source, dtype=torch.float64)
    kwargs = {"attn_mask": mask, "is_causal": mask_kind == "causal", "scale": 0.3}
    torch.testing.assert_close(
        reference.scaled_dot_product_attention(q, k, v, **kwargs),
        F.scaled_dot_product_attention(q, k, v, **kwargs),
    )


def test_attention_gqa_and_fully_masked_rows():
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k, v = (
        torch.randn(1, 2, 5, 8, dtype=torch.float64),
        torch.randn(1, 2, 5, 8, dtype=torch.float64),
    )
    torch.testing.assert_close(
        reference.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    )
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.all(out[:, :, 1] == 0) and torch.isfinite(out).all()
    # A mask with is_causal keeps what both keep, as torch's function does.
    both = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True
    )
    keep = mask & torch.ones(3, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(
        both, reference.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    )


@pytest.mark.parametrize(
    "activation", sorted([*reference.ACTIVATIONS, *reference.GATED_ACTIVATIONS])
)
def test_feed_forward_definition(activation):
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    gated = activation in reference.GATED_ACTIVATIONS
    w1 = torch.randn(20 * (2 if gated else 1), 12, dtype=torch.float64)
    b1 = torch.randn(w1.shape[0], dtype=torch.float64)
    w2, b2 = torch.randn(12, 20, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    pre = x @ w1.T + b1
    act = {
        "relu": F.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "swiglu": F.silu,
        "geglu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }[activation]
    hidden = act(pre[..., :20]) * pre[..., 20:] if gated else act(pre)
    torch.testing.assert_close(
        reference.feed_forward(x, w1, b1, w2, b2, activation=activation), hidden @ w2.T + b2
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.feed_forward(x, w1, b1, w2, b2, activation="tanh")
