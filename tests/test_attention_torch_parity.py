"""What torch's scaled_dot_product_attention accepts, fastformer's accepts with the same
result: batch and head broadcasting, a mask together with is_causal, any real scale,
dropout_p = 1, numpy and 0-d tensor arguments, head dim 0; and the edges of the APIs' own
arguments (window sizes beyond the sequence, the log-sum-exp's dtype), bfloat16 under
Triton's interpreter (which computes it wrongly: it falls back), and where the fallback
warning points."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastformer
from fastformer import backend, reference
from fastformer.ops import attention as attention_ops
from tests.conftest import requires_extension, requires_interpreter
from tests.test_attention import KERNEL_CASES, _check, _randn


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize(
    "q_lead, kv_lead, enable_gqa",
    [((1, 2), (3, 2), False), ((2, 1), (2, 3), False), ((1, 4), (2, 2), True)],
    ids=["batch", "heads", "batch-gqa"],
)
def test_leading_dims_broadcast_as_torch(
    kernels, device, impl, dtype, atol, q_lead, kv_lead, enable_gqa
):
    generator = torch.Generator().manual_seed(sum(q_lead) * 7 + sum(kv_lead))
    tensors = {
        "q": _randn(*q_lead, 5, 16, dtype=dtype, device=device, generator=generator),
        "k": _randn(*kv_lead, 7, 16, dtype=dtype, device=device, generator=generator),
        "v": _randn(*kv_lead, 7, 16, dtype=dtype, device=device, generator=generator),
    }
    _check(tensors, atol, enable_gqa=enable_gqa)
    if dtype == torch.float32:  # the reference is torch's function here
        q, k, v = (t.double() for t in tensors.values())
        torch.testing.assert_close(
            reference.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa),
            F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa),
        )


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_mask_with_is_causal_keeps_what_both_keep(kernels, device, impl, dtype, atol, mask_dtype):
    generator = torch.Generator().manual_seed(3)
    tensors = {
        name: _randn(2, 2, length, 16, dtype=dtype, device=device, generator=generator)
        for name, length in (("q", 6), ("k", 9), ("v", 9))
    }
    keep = torch.rand(6, 9, generator=generator) > 0.3
    mask = keep if mask_dtype == torch.bool else torch.randn(6, 9, generator=generator)
    tensors["mask"] = mask.to(device=device, dtype=dtype if mask_dtype != torch.bool else None)
    _check(tensors, atol, is_causal=True)
    q, k, v = (tensors[name].double() for name in "qkv")
    float_mask = tensors["mask"] if mask_dtype == torch.bool else tensors["mask"].double()
    torch.testing.assert_close(  # torch's function takes both too, and ANDs them
        reference.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, is_causal=True),
    )


@requires_extension
def test_arguments_torch_accepts():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, 8, generator=generator, dtype=torch.float64) for n in (4, 6, 6))
    for options in (
        {"scale": -0.5},
        {"scale": 0.0},
        {"scale": np.float32(0.3)},
        {"scale": torch.tensor(0.3)},
        {"dropout_p": np.float64(0.0)},
        {"dropout_p": torch.tensor(0.0)},
    ):
        torch.testing.assert_close(
            fastformer.scaled_dot_product_attention(q, k, v, **options),
            F.scaled_dot_product_attention(q, k, v, **options),
            msg=str(options),
        )
    # dropout_p = 1 drops every probability: zeros, and zero gradients.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fastformer.scaled_dot_product_attention(*leaves, dropout_p=1.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


@requires_extension
def test_head_dim_zero_averages_the_values():
    q, k = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 5, 0)
    v = torch.randn(1, 2, 5, 4)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(expected, v.mean(-2, keepdim=True).expand(1, 2, 3, 4))
    torch.testing.assert_close(fastformer.scaled_dot_product_attention(q, k, v), expected)
    flash = fastformer.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(flash.transpose(1, 2), expected)


@requires_extension
@pytest.mark.parametrize(
    "window", [(sys.maxsize, sys.maxsize), (-1, sys.maxsize), (sys.maxsize, -1), (2**64, 0)]
)
def test_window_beyond_the_sequence_hides_nothing(window):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 2, 8, generator=generator) for n in (5, 7, 7))

    def run(window_size):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fastformer.flash_attn_func(*leaves, window_size=window_size)
        out.square().sum().backward()
        return [out, *(t.grad for t in leaves)]

    # A side beyond L + S is unbounded; a right side of 0 stays causal.
    unbounded = (-1, 0 if window[1] == 0 else -1)
    for got, expected in zip(run(window), run(unbounded), strict=True):
        torch.testing.assert_close(got, expected)
    # The C++ op itself treats such sides (and offsets) the same way.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    op = torch.ops.fastformer.cpu_attention_fwd
    huge = op(qt, kt, vt, None, None, None, 0.3, 0.0, 0.0, 2, 2**62, 2**62)[0]
    torch.testing.assert_close(huge, op(qt, kt, vt, None, None, None, 0.3, 0.0, 0.0, 2, -1, -1)[0])


@requires_extension
def test_flash_lse_is_float32_on_every_path():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    _out, lse = fastformer.flash_attn_func(q, q, q, return_lse=True)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(
        lse, torch.logsumexp((q.transpose(1, 2) @ q.permute(0, 2, 3, 1)) / 8**0.5, dim=-1).float()
    )


@requires_extension
def test_mask_requiring_grad_runs_the_kernel_without_grad():
    q = torch.randn(1, 2, 4, 8)
    mask = torch.randn(4, 4, requires_grad=True)
    before = backend.fallback_counts[attention_ops.OP]
    with torch.no_grad():
        out = fastformer.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert backend.fallback_counts[attention_ops.OP] == before
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    # A float mask in another dtype than q's is added as it is, with or without its gradient
    # (torch's function rejects it; the fallback casts it).
    half_mask = torch.randn(4, 4).half()
    expected = F.scaled_dot_product_attention(q, q, q, attn_mask=half_mask.float())
    for requires_grad in (False, True):
        m = half_mask.clone().requires_grad_(requires_grad)
        torch.testing.assert_close(
            fastformer.scaled_dot_product_attention(q, q, q, attn_mask=m), expected
        )


@requires_interpreter
def test_bfloat16_in_the_interpreter_falls_back():
    q = torch.randn(1, 2, 16, 16).bfloat16()
    before = backend.fallback_counts[attention_ops.OP]
    with fastformer.triton_on_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backend.implementation(attention_ops.OP, q.device, q.dtype) == backend.TORCH_FALLBACK
        out = fastformer.scaled_dot_product_attention(q, q, q)
    assert backend.fallback_counts[attention_ops.OP] == before + 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


@requires_extension
def test_fallback_warning_points_at_the_callers_line(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())
    q = torch.randn(3, 1, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.vmap(lambda t: fastformer.scaled_dot_product_attention(t, t, t))(q)
    ours = [w for w in caught if "running plain PyTorch" in str(w.message)]
    assert ours and ours[0].filename == __file__
