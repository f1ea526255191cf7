"""Numerics: every op against the float64 reference where training data goes wrong.

1. NaN and Inf propagate exactly where the reference propagates them (outputs and gradients).
2. Fully masked attention rows give zeros with finite gradients.
3. Extreme magnitudes stay finite where the reference does.

Implementations: see tests/hardening.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import fastformer
from tests.conftest import requires_extension
from tests.hardening import (
    FEED_FORWARD_IMPLS,
    FP16_ATOL,
    FP32_ATOL,
    INF,
    KERNEL_IMPLS,
    NAN,
    Results,
    assert_all_like_reference,
    assert_finite_where_reference_is,
    assert_like_reference,
    attention_inputs,
    attention_triple,
    feed_forward_triple,
    float64,
    generator,
    layer_norm_triple,
    randn,
    with_value,
)
from tests.test_feed_forward import _inputs as feed_forward_inputs
from tests.test_layer_norm_residual import Flags
from tests.test_layer_norm_residual import _inputs as layer_norm_inputs

pytestmark = [
    # Nearly every test runs layer_norm_residual or feed_forward, which need fastformer._C.
    requires_extension,
    # NaN, Inf and overflow are these tests' inputs: numpy warns about them inside the
    # interpreter, which computes with numpy.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


# ----------------------------------------------------------------------------------------
# 1. NaN and Inf propagate as in the reference
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """One non-finite input element: tensors[tensor][index] = value."""

    tensor: str
    index: tuple[int, ...]
    value: float
    mask: str = "none"  # attention only: "none", "causal" or "bool"
    source: int = 23  # attention only: the number of keys


ATTENTION_POISONS = {
    # A query row: only that row's output is NaN; its scores reach every key's gradient.
    "nan-query": Poison("q", (0, 1, 4, 3), NAN),
    "nan-query-short-keys": Poison("q", (0, 1, 4, 3), NAN, source=7),
    "inf-query": Poison("q", (1, 0, 17, 0), INF),
    # A key: every query that sees it; with a mask only those the mask lets see it.
    "nan-key": Poison("k", (0, 1, 6, 2), NAN),
    "nan-key-causal": Poison("k", (0, 1, 6, 2), NAN, "causal"),
    "nan-key-bool-mask": Poison("k", (1, 1, 20, 2), NAN, "bool"),
    "inf-key-causal": Poison("k", (1, 0, 3, 5), INF, "causal"),
    "-inf-key": Poison("k", (0, 0, 11, 7), -INF),
}


def _cases(named: dict[str, object], impls: list) -> list:
    """pytest params (case, device, impl) for every case on every implementation."""
    params = []
    for name, case in named.items():
        for impl in impls:
            params.append(
                pytest.param(case, *impl.values, id=f"{name}-{impl.id}", marks=impl.marks)
            )
    return params


def _poisoned_attention(poison: Poison, device: str) -> tuple[Results, dict]:
    """Inputs (B=2, H=2, L=19, S) with the poisoned element, and the call's keyword arguments."""
    tensors = attention_inputs(device, shape=(2, 2, 19, poison.source, 16))
    tensors[poison.tensor] = with_value(tensors[poison.tensor], poison.index, poison.value)
    if poison.mask == "bool":
        # Key 20 hidden from the first 10 queries: the NaN reaches only the others.
        keep = torch.rand(19, poison.source, generator=generator(5)) > 0.3
        keep[:10, 20] = False
        keep[:, 0] = True  # no fully masked row: those are test 2's
        tensors["mask"] = keep.to(device)
    return tensors, {"is_causal": True} if poison.mask == "causal" else {}


@pytest.mark.parametrize(
    "poison, device, impl",
    _cases(ATTENTION_POISONS, KERNEL_IMPLS),
)
def test_attention_nan_inf_outputs_like_reference(use_implementation, poison, device, impl):
    """The output, in inference (no grad) and in training, NaN exactly where the reference's is."""
    use_implementation(device, impl)
    tensors, kwargs = _poisoned_attention(poison, device)
    with torch.no_grad():
        inference = fastformer.scaled_dot_product_attention(
            tensors["q"], tensors["k"], tensors["v"], attn_mask=tensors.get("mask"), **kwargs
        )
    fast, same, ref64 = attention_triple(tensors, **kwargs)
    assert_like_reference("out (no grad)", inference, same["out"], ref64["out"], FP32_ATOL)
    assert_like_reference("out", fast["out"], same["out"], ref64["out"], FP32_ATOL)


@pytest.mark.parametrize(
    "poison, device, impl",
    _cases(ATTENTION_POISONS, KERNEL_IMPLS),
)
def test_attention_nan_inf_gradients_like_reference(use_implementation, poison, device, impl):
    """grad_q, grad_k and grad_v NaN exactly where the reference's are: a poisoned query
    row's gradient stays in that row of grad_q; keys it cannot see keep finite gradients."""
    use_implementation(device, impl)
    tensors, kwargs = _poisoned_attention(poison, device)
    fast, same, ref64 = attention_triple(tensors, **kwargs)
    for name in ("grad_q", "grad_k", "grad_v"):
        assert_like_reference(name, fast[name], same[name], ref64[name], FP32_ATOL)


LAYER_NORM_POISONS = {
    "nan-x": Poison("x", (3, 5), NAN),
    "inf-x": Poison("x", (0, 0), INF),
    "-inf-residual": Poison("residual", (6, 36), -INF),
    "nan-residual": Poison("residual", (2, 1), NAN),
}


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("poison", LAYER_NORM_POISONS.values(), ids=LAYER_NORM_POISONS.keys())
def test_layer_norm_nan_inf_propagate_like_reference(
    use_implementation, device, impl, rms_norm, poison
):
    """A NaN stays in its row (out, h, grad_x, grad_residual); grad_weight sums over rows
    (NaN wherever the reference's is), grad_bias stays finite. An Inf makes LayerNorm's row
    NaN (Inf - mean) but RMSNorm's only at its own position (the row's rstd is 0)."""
    use_implementation(device, impl)
    tensors = layer_norm_inputs((7, 37), torch.float32, device, Flags(rms_norm=rms_norm), seed=3)
    tensors[poison.tensor] = with_value(tensors[poison.tensor], poison.index, poison.value)
    fast, same, ref64 = layer_norm_triple(tensors, rms_norm=rms_norm)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)


FEED_FORWARD_POISONS = {
    f"{name}-{activation}": (poison, activation)
    for name, poison in (
        ("nan-token", Poison("x", (4, 3), NAN)),
        ("inf-token", Poison("x", (0, 7), INF)),
        ("-inf-token", Poison("x", (8, 0), -INF)),
    )
    for activation in ("relu", "gelu", "silu", "swiglu")
}


@pytest.mark.parametrize(
    "case, device, impl",
    _cases(FEED_FORWARD_POISONS, FEED_FORWARD_IMPLS),
)
def test_feed_forward_nan_inf_propagate_like_reference(use_implementation, case, device, impl):
    """A non-finite token reaches its own output row and grad_x row; the weight gradients
    sum over tokens, so they are NaN wherever the reference's are."""
    use_implementation(device, impl)
    poison, activation = case
    tensors = feed_forward_inputs((11,), 16, 24, 16, activation, torch.float32, device, seed=4)
    tensors["x"] = with_value(tensors["x"], poison.index, poison.value)
    fast, same, ref64 = feed_forward_triple(tensors, activation=activation)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)


# ----------------------------------------------------------------------------------------
# 2. Fully masked attention rows: zeros, finite gradients
# ----------------------------------------------------------------------------------------


def _fully_masked_mask(kind: str, device: str) -> Tensor:
    """A mask with fully masked query rows for inputs (2, 2, 19, 23): rows 0, 7 and 18 of
    every head (bool, float -inf), or every query of batch 1 (key padding, (B, 1, 1, S))."""
    if kind == "key-padding":
        keep = torch.ones(2, 1, 1, 23, dtype=torch.bool)
        keep[0, ..., 15:] = False  # batch 0: its last 8 keys are padding
        keep[1] = False  # batch 1: padding only
        return keep.to(device)
    keep = torch.rand(2, 2, 19, 23, generator=generator(6)) > 0.4
    keep[..., 1] = True  # every row sees a key...
    keep[:, :, [0, 7, 18]] = False  # ...but these
    if kind == "bool":
        return keep.to(device)
    mask = torch.randn(keep.shape, generator=generator(7))
    return mask.masked_fill(~keep, -INF).to(device)


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("kind", ["bool", "float-inf", "key-padding"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(use_implementation, device, impl, kind):
    use_implementation(device, impl)
    tensors = attention_inputs(device)
    tensors["mask"] = _fully_masked_mask(kind, device)
    fast, same, ref64 = attention_triple(tensors)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)
    mask = tensors["mask"].expand(2, 2, 19, 23)
    visible = mask if mask.dtype == torch.bool else mask != -INF
    fully_masked = ~visible.any(-1)
    assert fully_masked.sum() >= 3
    assert torch.all(fast["out"][fully_masked] == 0)
    for name in ("grad_q", "grad_k", "grad_v"):
        assert fast[name].isfinite().all(), f"{name}: non-finite"
    assert torch.all(fast["grad_q"][fully_masked] == 0)


# ----------------------------------------------------------------------------------------
# 3. Extreme magnitudes stay finite where the reference does
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
def test_attention_scores_around_1e4_in_float16(use_implementation, device, impl):
    """q . k * scale up to ~1e4 in float16: exp would overflow without the running max."""
    use_implementation(device, impl)
    tensors = attention_inputs(device, torch.float16, seed=10)
    tensors["q"] = tensors["q"] * 24
    tensors["k"] = tensors["k"] * 24
    fast, same, ref64 = attention_triple(tensors, scale=1.0)
    peak = (float64(tensors)["q"] @ float64(tensors)["k"].transpose(-2, -1)).abs().max()
    assert 5e3 < peak < 6e4, f"scores peak at {peak:.0f}: not what this test is about"
    assert_finite_where_reference_is(fast, same)
    assert_all_like_reference(fast, same, ref64, FP16_ATOL)


LARGE_MASK_VALUES = [
    pytest.param(torch.finfo(torch.float32).min, id="finfo-min"),
    pytest.param(-1e30, id="minus-1e30"),
]


def _large_mask_inputs(big: float, device: str, *, whole_row: bool) -> Results:
    """A float32 mask that "masks" 40% of the keys with a huge finite negative instead of
    -inf (as Hugging Face models do); with whole_row, query 5 of (batch 0, head 1) has every
    key masked that way."""
    tensors = attention_inputs(device, seed=11)
    mask = torch.randn(2, 2, 19, 23, generator=generator(12))
    mask = mask.masked_fill(torch.rand(mask.shape, generator=generator(13)) < 0.4, big)
    if whole_row:
        mask[0, 1, 5] = big
    tensors["mask"] = mask.to(device)
    return tensors


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("big", LARGE_MASK_VALUES)
def test_attention_large_float_mask_values(use_implementation, device, impl, big):
    """The masked keys get zero weight; nothing overflows to Inf or NaN."""
    use_implementation(device, impl)
    tensors = _large_mask_inputs(big, device, whole_row=False)
    fast, same, ref64 = attention_triple(tensors)
    assert_finite_where_reference_is(fast, same)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("big", LARGE_MASK_VALUES)
def test_attention_row_masked_by_large_values_forward(use_implementation, device, impl, big):
    """A row whose every key carries the huge negative attends uniformly (its scores are
    equal once rounded, in the reference too); its gradients stay finite."""
    use_implementation(device, impl)
    fast, same, ref64 = attention_triple(_large_mask_inputs(big, device, whole_row=True))
    assert_finite_where_reference_is(fast, same)
    assert_like_reference("out", fast["out"], same["out"], ref64["out"], FP32_ATOL)


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("big", LARGE_MASK_VALUES)
def test_attention_row_masked_by_large_values_gradients(use_implementation, device, impl, big):
    use_implementation(device, impl)
    fast, same, ref64 = attention_triple(_large_mask_inputs(big, device, whole_row=True))
    for name in ("grad_q", "grad_k", "grad_v"):
        assert_like_reference(name, fast[name], same[name], ref64[name], FP32_ATOL)


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layernorm", "rmsnorm"])
def test_layer_norm_tiny_variance(use_implementation, device, impl, rms_norm):
    """Rows that are a constant plus 1e-6 noise with eps = 1e-12: rstd ~ 1e6 amplifies any
    cancellation in the variance (one-pass E[h^2] - E[h]^2 would give garbage or NaN).
    RMSNorm: rows of magnitude 1e-6."""
    use_implementation(device, impl)
    rows, hidden = 9, 300
    noise = 1e-6 * randn(rows, hidden, device=device, seed=14)
    offsets = 0.0 if rms_norm else randn(rows, 1, device=device, seed=15)
    tensors = {
        "x": offsets + noise,
        "residual": None,
        "weight": 1 + 0.5 * randn(hidden, device=device, seed=16),
        "bias": randn(hidden, device=device, seed=17),
    }
    fast, same, ref64 = layer_norm_triple(tensors, rms_norm=rms_norm, eps=1e-12)
    assert_finite_where_reference_is(fast, same)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)


@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("magnitude", [1e4, 1e15, 1e30])
def test_layer_norm_huge_values(use_implementation, device, impl, rms_norm, magnitude):
    """float32 rows of magnitude up to 1e30: the squares overflow float32 from ~1e19 on (in
    the reference too), which must give the reference's finite result, not NaN."""
    use_implementation(device, impl)
    tensors = layer_norm_inputs((5, 70), torch.float32, device, Flags(rms_norm=rms_norm), seed=18)
    tensors["x"] = tensors["x"] * magnitude
    tensors["residual"] = tensors["residual"] * magnitude
    fast, same, ref64 = layer_norm_triple(tensors, rms_norm=rms_norm)
    assert_finite_where_reference_is(fast, same)
    assert_all_like_reference(fast, same, ref64, FP32_ATOL)


@pytest.mark.parametrize("device, impl", FEED_FORWARD_IMPLS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
def test_feed_forward_large_inputs_float16(use_implementation, device, impl, activation):
    """float16 tokens of magnitude ~1e3, pre-activations to ~4e3: x^3 (gelu_tanh) and
    exp(-x) (silu) would overflow if computed in float16. The reference stays finite, so
    must fastformer."""
    use_implementation(device, impl)
    tensors = feed_forward_inputs((9,), 16, 24, 16, activation, torch.float16, device, seed=19)
    # Gated: silu(gate) * up squares the magnitude; keep it under float16's 65504.
    tensors["x"] = tensors["x"] * (60 if activation == "swiglu" else 1000)
    fast, same, ref64 = feed_forward_triple(tensors, activation=activation)
    assert_finite_where_reference_is(fast, same)
    assert_all_like_reference(fast, same, ref64, FP16_ATOL)
