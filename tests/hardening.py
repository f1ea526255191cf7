"""Shared by the hardening tests (test_numerics.py, test_robustness.py): the implementations
each test runs on, seeded inputs, each op's (fast, same precision, float64 reference)
results, and comparisons that require NaN and Inf exactly where the reference has them.

Implementations: "cpu" is fastformer's CPU path (the C++ kernels), "interpreter" the Triton
kernels run by Triton's interpreter on CPU tensors (fp32 and tiny shapes: it runs every
program in Python, ~10 ms each), "cuda" the GPU kernels (skipped without a GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import fastformer
from fastformer import reference
from tests.conftest import requires_cuda, requires_interpreter
from tests.test_attention import _grads as attention_results
from tests.test_feed_forward import _CUDA_READY as FEED_FORWARD_CUDA_READY
from tests.test_feed_forward import _run as feed_forward_results
from tests.test_layer_norm_residual import _run as layer_norm_results
from tests.tolerance import assert_close_to_reference

Results = dict[str, Tensor | None]
Step = Callable[[], list[Tensor]]  # one forward + backward; returns outputs and gradients

# (device, implementation) as the use_implementation fixture of conftest.py takes them.
CPU = pytest.param("cpu", "c++", id="cpu")
INTERPRETER = pytest.param("cpu", "triton", id="interpreter", marks=requires_interpreter)
CUDA = pytest.param("cuda", "triton", id="cuda", marks=requires_cuda)
KERNEL_IMPLS = [CPU, INTERPRETER, CUDA]  # attention and layer_norm_residual
FEED_FORWARD_IMPLS = [
    CPU,
    pytest.param(
        "cuda",
        "c++/cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not FEED_FORWARD_CUDA_READY, reason="needs the CUDA kernels (a GPU, an nvcc build)"
        ),
    ),
]

NAN, INF = float("nan"), float("inf")
FP32_ATOL, FP16_ATOL = 1e-5, 1e-3
MIB = 2**20


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """Fresh standard-normal values, drawn on the CPU so every device gets the same ones."""
    return torch.randn(*shape, generator=generator(seed)).to(device=device, dtype=dtype)


def float64(tensors: Results) -> Results:
    return {
        name: t.double() if t is not None and t.is_floating_point() else t
        for name, t in tensors.items()
    }


def with_value(tensor: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


# ----------------------------------------------------------------------------------------
# Comparison with the reference, non-finite values included
# ----------------------------------------------------------------------------------------


def differences(name: str, what: str, fast: Tensor, expected: Tensor) -> str:
    where = (fast != expected).nonzero()[:5].tolist()
    return (
        f"{name}: {what} at {int(fast.sum())} positions, the reference at "
        f"{int(expected.sum())}; first differences at {where}"
    )


def assert_like_reference(
    name: str, fast: Tensor, same: Tensor, ref64: Tensor, atol: float
) -> None:
    """NaN exactly where the float64 reference has NaN, the same infinities, and the
    tolerance rule of tests/tolerance.py on every position where the reference is finite."""
    fast, same, ref64 = fast.detach().cpu(), same.detach().cpu(), ref64.detach().cpu()
    assert fast.shape == ref64.shape, f"{name}: shape {list(fast.shape)} != {list(ref64.shape)}"
    assert torch.equal(fast.isnan(), ref64.isnan()), differences(
        name, "NaN", fast.isnan(), ref64.isnan()
    )
    infinite = ref64.isinf()
    assert torch.equal(fast.isinf(), infinite), differences(name, "Inf", fast.isinf(), infinite)
    assert torch.equal(fast[infinite].double(), ref64[infinite]), f"{name}: Inf of another sign"
    finite = ref64.isfinite()
    assert_close_to_reference(name, fast[finite], same[finite], ref64[finite], atol)


def assert_all_like_reference(fast: Results, same: Results, ref64: Results, atol: float) -> None:
    for name, ref in ref64.items():
        if ref is None:
            assert fast[name] is None, f"{name}: expected no result, got one"
        else:
            assert fast[name] is not None, f"{name}: missing"
            assert_like_reference(name, fast[name], same[name], ref, atol)


def assert_finite_where_reference_is(results: Results, same: Results) -> None:
    """Extreme inputs: every output and gradient finite wherever the reference computed in
    the inputs' own precision is (which is what a user of plain PyTorch would get)."""
    for name, value in results.items():
        if value is None:
            continue
        finite = same[name].detach().cpu().isfinite()
        assert finite.any(), f"{name}: the test's inputs overflow the reference itself"
        assert value.detach().cpu()[finite].isfinite().all(), f"{name}: non-finite values"


# ----------------------------------------------------------------------------------------
# Each op against the reference: (fastformer, reference in the inputs' dtype, float64)
# ----------------------------------------------------------------------------------------


def attention_triple(tensors: Results, **kwargs) -> tuple[Results, Results, Results]:
    """Outputs and gradients of q, k, v; a float mask in tensors["mask"] gets no gradient."""
    q, v = tensors["q"], tensors["v"]
    grad_out = randn(*q.shape[:-1], v.shape[-1], device=str(q.device), seed=99)
    fast = attention_results(fastformer.scaled_dot_product_attention, tensors, grad_out, **kwargs)
    same = attention_results(reference.scaled_dot_product_attention, tensors, grad_out, **kwargs)
    ref64 = attention_results(
        reference.scaled_dot_product_attention, float64(tensors), grad_out, **kwargs
    )
    return fast, same, ref64


def layer_norm_triple(tensors: Results, **kwargs) -> tuple[Results, Results, Results]:
    x = tensors["x"]
    device = str(x.device)
    grads = {
        "out": randn(*x.shape, device=device, seed=98),
        "h": randn(*x.shape, device=device, seed=97),
    }
    fast = layer_norm_results(fastformer.layer_norm_residual, tensors, grads, **kwargs)
    same = layer_norm_results(reference.layer_norm_residual, tensors, grads, **kwargs)
    ref64 = layer_norm_results(reference.layer_norm_residual, float64(tensors), grads, **kwargs)
    return fast, same, ref64


def feed_forward_triple(tensors: Results, **kwargs) -> tuple[Results, Results, Results]:
    x, w2 = tensors["x"], tensors["w2"]
    grad_out = randn(*x.shape[:-1], w2.shape[0], device=str(x.device), seed=96)
    fast = feed_forward_results(fastformer.feed_forward, tensors, grad_out, **kwargs)
    same = feed_forward_results(reference.feed_forward, tensors, grad_out, **kwargs)
    ref64 = feed_forward_results(reference.feed_forward, float64(tensors), grad_out, **kwargs)
    return fast, same, ref64


def attention_inputs(
    device: str, dtype: torch.dtype = torch.float32, *, shape=(2, 2, 19, 23, 16), seed: int = 0
) -> Results:
    """q (B, H, L, D), k and v (B, H, S, D): L and S not multiples of the interpreter's
    16 x 16 tile, so every program has a partial edge block."""
    batch, heads, length, source, dim = shape
    return {
        "q": randn(batch, heads, length, dim, device=device, dtype=dtype, seed=seed),
        "k": randn(batch, heads, source, dim, device=device, dtype=dtype, seed=seed + 1),
        "v": randn(batch, heads, source, dim, device=device, dtype=dtype, seed=seed + 2),
    }
