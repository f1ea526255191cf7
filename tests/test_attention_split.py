"""The split forward of the Triton attention (decoding): the keys of one query block shared by
several programs, whose partial results a combine kernel merges. Checked against the
unsplit kernel and, through the ops with their backward, against the float64 reference.
Through Triton's interpreter on CPU, natively on a GPU."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastformer
from tests.conftest import HAS_CUDA, HAS_INTERPRETER
from tests.fuzzing import fuzz_settings
from tests.test_attention import _check

attention_kernels = pytest.importorskip("fastformer_kernels.attention")

# (device, dtype): the interpreter mishandles bfloat16, a GPU runs it.
TRITON_CASES = [
    *(
        pytest.param("cpu", dtype, id=f"interpreter-{dtype}".replace("torch.", ""))
        for dtype in (torch.float32, torch.float16)
        if HAS_INTERPRETER
    ),
    *(
        pytest.param("cuda", dtype, id=f"cuda-{dtype}".replace("torch.", ""))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        if HAS_CUDA
    ),
]
needs_triton = pytest.mark.skipif(not TRITON_CASES, reason="needs Triton's interpreter or a GPU")


def _triton(device: str):
    """CPU tensors run the Triton kernels through the interpreter inside this context."""
    return fastformer.triton_on_cpu(True) if device == "cpu" else contextlib.nullcontext()


# Variants of a decoding step: (length L, query heads, kv heads, mask or "alibi", band,
# dropout_p).
VARIANTS = {
    "one-query-causal": (1, 2, 2, None, "causal", 0.0),
    "chunk-of-5-gqa": (5, 4, 2, None, "causal", 0.0),
    "float-mask": (3, 2, 1, "float", None, 0.0),
    "bool-mask": (2, 2, 2, "bool", None, 0.0),
    "alibi-causal-gqa": (3, 4, 2, "alibi", "causal", 0.0),
    "window": (1, 2, 2, None, "window", 0.0),
    "dropout": (4, 2, 2, None, None, 0.2),
}


def _launch(device, dtype, variant, splits, *, source=530, seed=0):
    length, heads, kv_heads, mask_kind, band, dropout_p = VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q, k, v = (
        randn(1, heads, length, 16),
        randn(1, kv_heads, source, 16),
        randn(1, kv_heads, source, 24),
    )
    mask = slopes = None
    if mask_kind == "alibi":  # slopes per (batch, head), as flash_attn_func passes them
        slopes = torch.rand(1, heads, generator=generator).to(device) * 0.1
    elif mask_kind == "float":  # a key-padding style float mask, broadcast over heads and rows
        mask = randn(1, 1, 1, source).expand(1, heads, length, source)
    elif mask_kind == "bool":
        keep = torch.rand(1, 1, length, source, generator=generator) > 0.3
        mask = keep.to(device).expand(1, heads, length, source)
    left, right = {"causal": (-1, 0), "window": (300, 0)}.get(band, (-1, -1))
    seed_tensor = torch.tensor([1234], dtype=torch.int64, device=device)
    with _triton(device):
        return attention_kernels.attention_forward(
            q,
            k,
            v,
            mask,
            slopes,
            seed_tensor,
            16**-0.5,
            0.0,
            dropout_p,
            source - length,
            left,
            right,
            True,
            splits=splits,
        )


@needs_triton
@pytest.mark.parametrize("device, dtype", TRITON_CASES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("splits", [2, 3, 40])
def test_split_forward_matches_one_program(device, dtype, variant, splits):
    """out, lse and the backward's statistics of a split forward equal the unsplit kernel's
    up to rounding (the merge reorders the sums; in half precision each split rounds its
    probabilities against its own row max), and the half-precision residual is out's
    rounding error; 40 splits leave some programs without keys. Dropout draws the same mask
    in both."""
    whole = _launch(device, dtype, variant, 1)
    split = _launch(device, dtype, variant, splits)
    out_atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(split.out.float(), whole.out.float(), atol=out_atol, rtol=1e-2)
    torch.testing.assert_close(split.lse, whole.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.stats, whole.stats, atol=1e-5, rtol=1e-5)
    if dtype != torch.float32:  # the residual is the rounding error of the float32 out
        half_spacing = torch.finfo(dtype).eps / 2 * split.out.double().abs()
        assert (split.out_residual.double().abs() <= half_spacing + 1e-12).all()
        assert (split.out_residual != 0).any()


@needs_triton
@pytest.mark.parametrize("device, dtype", TRITON_CASES)
def test_decoding_through_the_ops_splits_and_matches_the_reference(device, dtype, monkeypatch):
    """A decoding step through scaled_dot_product_attention (and its backward, from the split
    forward's statistics) meets the DESIGN rule against float64, and did split."""
    chosen = []
    policy = attention_kernels.kv_splits
    monkeypatch.setattr(
        attention_kernels, "kv_splits", lambda *a: chosen.append(policy(*a)) or chosen[-1]
    )
    generator = torch.Generator().manual_seed(5)
    source = 600

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    tensors = {"q": randn(1, 2, 1, 16), "k": randn(1, 2, source, 16), "v": randn(1, 2, source, 16)}
    tensors["mask"] = randn(1, 1, 1, source)  # broadcast float mask, as a padded batch has
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    with _triton(device):
        _check(tensors, atol)
    assert chosen and all(s > 1 for s in chosen), chosen


def test_split_policy():
    """kv_splits: only short query sets (L <= 16) with fewer (batch, head) pairs than
    multiprocessors split; about two programs per multiprocessor, at least 256 visible keys a
    split (the band counts), at most 64 splits."""
    cpu = torch.device("cpu")  # multiprocessor_count stands at 4 for CPU tensors

    def splits(batch, heads, length, source, offset=0, left=-1, right=-1):
        problem = attention_kernels._Problem(batch, heads, heads, length, source, 64, 64)
        return attention_kernels.kv_splits(problem, cpu, offset, left, right)

    multiprocessors = attention_kernels.multiprocessor_count(cpu)
    assert splits(1, 1, 1, 100_000) == 2 * multiprocessors
    assert splits(1, 2, 16, 100_000) == math.ceil(2 * multiprocessors / 2)
    assert splits(1, 1, 17, 100_000) == 1  # several query blocks: programs enough
    assert splits(1, multiprocessors, 1, 100_000) == 1
    assert splits(1, 1, 1, 700) == 2  # 700 keys: two splits of at least 256
    assert splits(1, 1, 1, 255) == 1
    # causal decoding sees every key; a window of 300 keys left of the diagonal sees 301
    assert splits(1, 1, 1, 4096, offset=4095, right=0) == 2 * multiprocessors
    assert splits(1, 1, 1, 4096, offset=4095, left=300, right=0) == 1
    with pytest.raises(ValueError, match="splits must be >= 1"):
        q = torch.zeros(1, 1, 1, 16)
        attention_kernels.attention_forward(
            q, q, q, None, None, None, 1.0, 0.0, 0.0, 0, -1, -1, False, splits=0
        )


@needs_triton
@fuzz_settings(ci_examples=12)
@given(
    length=st.integers(1, 16),
    source=st.integers(200, 700),
    offset_shift=st.integers(-40, 40),
    window_left=st.sampled_from([-1, 0, 1, 37, 300]),
    window_right=st.sampled_from([-1, 0, 5]),
    splits=st.integers(2, 9),
    seed=st.integers(0, 2**16),
)
def test_split_key_ranges_fuzzed(
    length, source, offset_shift, window_left, window_right, splits, seed
):
    """Random bands (offsets around the bottom-right diagonal, windows on either side) and
    split counts: the splits cover exactly the keys the unsplit kernel visits, rows without
    a visible key included (zeros, -inf statistics)."""
    device, dtype = TRITON_CASES[0].values
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(1, 2, rows, 16, generator=generator).to(device=device, dtype=dtype)
        for rows in (length, source, source)
    )
    arguments = (
        q,
        k,
        v,
        None,
        None,
        None,
        0.25,
        0.0,
        0.0,
        source - length + offset_shift,
        window_left,
        window_right,
        False,
    )
    with _triton(device):
        whole = attention_kernels.attention_forward(*arguments, splits=1)
        split = attention_kernels.attention_forward(*arguments, splits=splits)
    out_atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(split.out.float(), whole.out.float(), atol=out_atol, rtol=1e-2)
    torch.testing.assert_close(split.stats, whole.stats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.lse, whole.lse, atol=1e-5, rtol=1e-5)
