"""One small forward + backward of every CUDA kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/sanitize_cases.py
    compute-sanitizer --tool racecheck python tools/sanitize_cases.py

Small awkward shapes (lengths and widths off the block sizes, so the edge masks run), each
kernel path once: attention with a float mask, a boolean mask, causal, a window, GQA,
dropout, ALiBi slopes and soft-capping; residual + LayerNorm and RMSNorm with dropout; the
feed-forward with both CUDA paths (FASTFORMER_FF_EPILOGUE=separate and cublaslt) and a gated
activation. Exits 1 if a result is not finite, so that a sanitizer run also checks that the
kernels ran.
"""

from __future__ import annotations

import os
import sys

import torch

import fastformer


def _check(name: str, *tensors: torch.Tensor | None) -> bool:
    finite = all(t is None or bool(torch.isfinite(t).all()) for t in tensors)
    print(f"{name}: {'ok' if finite else 'NOT FINITE'}")
    return finite


def _leaf(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_()


def attention_cases(dtype: torch.dtype) -> bool:
    ok = True
    q, k, v = (
        _leaf(2, 4, 37, 40, dtype=dtype),
        _leaf(2, 2, 45, 40, dtype=dtype),
        _leaf(2, 2, 45, 24, dtype=dtype),
    )
    float_mask = torch.randn(2, 1, 37, 45, device="cuda", dtype=dtype)
    bool_mask = torch.rand(37, 45, device="cuda") > 0.3
    cases = {
        "attention float mask, GQA, Dv != D": dict(attn_mask=float_mask, enable_gqa=True),
        "attention bool mask, dropout": dict(attn_mask=bool_mask, dropout_p=0.2, enable_gqa=True),
        "attention causal": dict(is_causal=True, enable_gqa=True),
    }
    for name, kwargs in cases.items():
        out = fastformer.scaled_dot_product_attention(q, k, v, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        ok &= _check(name, out, *grads)
    qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    slopes = torch.rand(2, 4, device="cuda")
    flash_cases = {
        "flash_attn_func window, causal": dict(window_size=(7, 0)),
        "flash_attn_func ALiBi (B, H), softcap, causal": dict(alibi_slopes=slopes, softcap=5.0),
    }
    for name, kwargs in flash_cases.items():
        out, lse = fastformer.flash_attn_func(qf, kf, vf, causal=True, return_lse=True, **kwargs)
        grads = torch.autograd.grad(out, (qf, kf, vf), torch.randn_like(out))
        ok &= _check(name, out, lse, *grads)
    return ok


def layer_norm_cases(dtype: torch.dtype) -> bool:
    ok = True
    for rms_norm in (False, True):
        x, residual = _leaf(67, 300, dtype=dtype), _leaf(67, 300, dtype=dtype)
        weight, bias = _leaf(300, dtype=dtype), None if rms_norm else _leaf(300, dtype=dtype)
        out, h = fastformer.layer_norm_residual(
            x, residual, weight, bias, dropout_p=0.1, rms_norm=rms_norm
        )
        leaves = [t for t in (x, residual, weight, bias) if t is not None]
        grads = torch.autograd.grad((out, h), leaves, (torch.randn_like(out), torch.randn_like(h)))
        ok &= _check(f"layer_norm_residual rms_norm={rms_norm}", out, h, *grads)
    return ok


def feed_forward_cases(dtype: torch.dtype) -> bool:
    ok = True
    for path in ("separate", "cublaslt"):
        os.environ["FASTFORMER_FF_EPILOGUE"] = path
        for activation, hidden in (("gelu_tanh", 96), ("relu", 96), ("swiglu", 2 * 88)):
            x = _leaf(3, 29, 64, dtype=dtype)
            w1, b1 = _leaf(hidden, 64, dtype=dtype), _leaf(hidden, dtype=dtype)
            w2, b2 = (
                _leaf(64, hidden // (2 if activation == "swiglu" else 1), dtype=dtype),
                _leaf(64, dtype=dtype),
            )
            out = fastformer.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=0.1)
            grads = torch.autograd.grad(out, (x, w1, b1, w2, b2), torch.randn_like(out))
            ok &= _check(f"feed_forward {path} {activation}", out, *grads)
    os.environ.pop("FASTFORMER_FF_EPILOGUE")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        ok &= attention_cases(dtype) & layer_norm_cases(dtype) & feed_forward_cases(dtype)
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
