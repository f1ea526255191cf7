"""fastformer.scaled_dot_product_attention and flash_attn_func against fastformer/reference.py
(the C++ CPU kernels; the Triton kernels through the interpreter on CPU, natively on a GPU),
and the SDPA semantics checked against torch's own function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastformer
from fastformer import reference
from fastformer.ops import attention as attention_ops
from tests.conftest import (
    HAS_EXTENSION,
    HAS_INTERPRETER,
    implementation_cases,
    requires_extension,
    requires_interpreter,
)
from tests.tolerance import assert_all_close_to_reference

# (device, implementation, dtype, atol): the C++ CPU kernels (float16 and bfloat16 computed in
# float32, float64 too), the Triton kernels through the interpreter (no bfloat16: the
# interpreter mishandles it) and on a GPU.
KERNEL_CASES = implementation_cases()
if HAS_EXTENSION:
    KERNEL_CASES.append(pytest.param("cpu", "c++", torch.float64, 1e-10, id="cpu-c++-float64"))


def _randn(*shape, dtype, device, generator):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def _grads(fn, tensors: dict, grad_out: torch.Tensor, **kwargs) -> dict:
    leaves = {
        k: v.detach().clone().requires_grad_(k in ("q", "k", "v")) if v is not None else None
        for k, v in tensors.items()
    }
    out = fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        **{**kwargs, **({"attn_mask": leaves["mask"]} if "mask" in leaves else {})},
    )
    out.backward(grad_out.to(out.dtype))
    return {"out": out.detach(), **{f"grad_{k}": leaves[k].grad for k in ("q", "k", "v")}}


def _check(tensors: dict, atol: float, **kwargs) -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    # The output's shape: q's and k's leading dimensions broadcast (with GQA q's heads).
    if kwargs.get("enable_gqa", False):
        lead = (*torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]), q.shape[-3])
    else:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    out_shape = (*lead, q.shape[-2], v.shape[-1])
    grad_out = torch.randn(out_shape, generator=generator).to(q.device)
    fast = _grads(fastformer.scaled_dot_product_attention, tensors, grad_out, **kwargs)
    same = _grads(reference.scaled_dot_product_attention, tensors, grad_out, **kwargs)
    as64 = {
        k: None if t is None else (t.double() if t.is_floating_point() else t)
        for k, t in tensors.items()
    }
    ref64 = _grads(reference.scaled_dot_product_attention, as64, grad_out, **kwargs)
    assert_all_close_to_reference(fast, same, ref64, atol)


MASKS = ["none", "causal", "bool", "float", "key_padding", "broadcast_heads"]


def _mask(kind, batch, heads, length, source, *, device, dtype, generator):
    if kind == "bool":
        keep = torch.rand(length, source, generator=generator) > 0.3
        return keep.to(device)
    if kind == "float":
        return _randn(batch, heads, length, source, dtype=dtype, device=device, generator=generator)
    if kind == "key_padding":  # (B, 1, 1, S): the last keys of each batch padded away
        keep = torch.ones(batch, 1, 1, source, dtype=torch.bool)
        keep[0, ..., source // 2 :] = False
        return keep.to(device)
    if kind == "broadcast_heads":  # (1, H, L, S) float with -inf holes
        mask = _randn(1, heads, length, source, dtype=dtype, device=device, generator=generator)
        return mask.masked_fill(
            torch.rand(mask.shape, generator=generator).to(device) < 0.2, float("-inf")
        )
    return None


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("lengths", [(1, 17), (17, 17), (37, 70), (70, 37)], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("head_dims", [(16, 16), (40, 24)], ids=["d16", "d40-dv24"])
def test_matches_reference(
    kernels, device, impl, dtype, atol, mask_kind, lengths, heads, head_dims
):
    generator = torch.Generator().manual_seed(hash((mask_kind, lengths, heads, head_dims)) % 2**31)
    (length, source), (q_heads, kv_heads), (dim, value_dim) = lengths, heads, head_dims
    batch = 2
    tensors = {
        "q": _randn(batch, q_heads, length, dim, dtype=dtype, device=device, generator=generator),
        "k": _randn(batch, kv_heads, source, dim, dtype=dtype, device=device, generator=generator),
        "v": _randn(
            batch, kv_heads, source, value_dim, dtype=dtype, device=device, generator=generator
        ),
    }
    mask = _mask(
        mask_kind, batch, q_heads, length, source, device=device, dtype=dtype, generator=generator
    )
    if mask is not None:
        tensors["mask"] = mask
    _check(tensors, atol, is_causal=mask_kind == "causal", enable_gqa=q_heads != kv_heads)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
def test_fully_masked_rows_give_zeros_and_finite_grads(kernels, device, impl, dtype, atol):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (
        _randn(1, 2, n, 32, dtype=dtype, device=device, generator=generator) for n in (5, 9, 9)
    )
    keep = torch.rand(5, 9, generator=generator).to(device) > 0.5
    keep[1] = False  # query 1 sees no key
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = fastformer.scaled_dot_product_attention(*leaves, attn_mask=keep)
    out.sum().backward()
    assert torch.all(out[:, :, 1] == 0)
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.all(q.grad[:, :, 1] == 0)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize(
    "window, causal", [((-1, -1), True), ((3, 0), True), ((2, 5), False), ((-1, 4), False)]
)
@pytest.mark.parametrize("lengths", [(9, 23), (23, 9), (16, 16)], ids=str)
def test_flash_attn_func_band_and_lse(kernels, device, impl, dtype, atol, window, causal, lengths):
    """Bottom-right causal and sliding windows, against the reference with the band as an
    explicit mask; the log-sum-exp against float64."""
    generator = torch.Generator().manual_seed(3)
    length, source = lengths
    q = _randn(2, length, 4, 32, dtype=dtype, device=device, generator=generator)
    k = _randn(2, source, 2, 32, dtype=dtype, device=device, generator=generator)
    v = _randn(2, source, 2, 32, dtype=dtype, device=device, generator=generator)
    out, lse = fastformer.flash_attn_func(
        q, k, v, causal=causal, window_size=window, return_lse=True
    )
    rows = torch.arange(length)[:, None] + source - length
    cols = torch.arange(source)[None, :]
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(length, source, dtype=torch.bool)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    visible = visible.to(device)
    q64, k64, v64 = (t.transpose(1, 2).double() for t in (q, k, v))
    expected = reference.scaled_dot_product_attention(
        q64, k64, v64, attn_mask=visible, enable_gqa=True
    )
    same = reference.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=visible, enable_gqa=True
    )
    assert_all_close_to_reference(
        {"out": out.transpose(1, 2)}, {"out": same}, {"out": expected}, atol
    )
    scores = (q64 @ k64.repeat_interleave(2, dim=1).transpose(-2, -1)) / 32**0.5
    expected_lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    finite = torch.isfinite(expected_lse)
    torch.testing.assert_close(
        lse[finite].double(),
        expected_lse[finite],
        rtol=0,
        atol=1e-4 if dtype == torch.float32 else 2e-2,
    )
    assert torch.all(lse[~finite] == float("-inf"))


def _dropout_keep(device, dtype, p, seed, length=7, source=48):
    """The keep-mask the kernel draws, read off through a one-hot value matrix: with q = 0
    every probability is 1 / S, so out[i, j] = keep[i, j] / ((1 - p) * S)."""
    q = torch.zeros(1, 1, length, 16, device=device, dtype=dtype)
    k = torch.randn(1, 1, source, 16, device=device, dtype=dtype)
    v = torch.eye(source, device=device, dtype=dtype)[None, None]
    torch.manual_seed(seed)
    out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return out[0, 0].float() * (1 - p) * source > 0.5


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
def test_dropout_statistics_seeding_and_gradients(kernels, device, impl, dtype, atol):
    p = 0.3
    keeps = [_dropout_keep(device, dtype, p, seed, length=64, source=128) for seed in (1, 1, 2)]
    kept = keeps[0].float().mean().item()
    assert abs(kept - (1 - p)) < 0.01 * 8, f"kept fraction {kept:.3f}"  # 8k draws: +-0.04
    assert torch.equal(keeps[0], keeps[1]) and not torch.equal(keeps[0], keeps[2])
    # Gradients consistent with the mask: the reference given the same mask agrees.
    generator = torch.Generator().manual_seed(4)
    length, source = 7, 48
    tensors = {
        "q": _randn(1, 1, length, 16, dtype=dtype, device=device, generator=generator),
        "k": _randn(1, 1, source, 16, dtype=dtype, device=device, generator=generator),
        "v": _randn(1, 1, source, 16, dtype=dtype, device=device, generator=generator),
    }
    keep = _dropout_keep(device, dtype, p, seed=9)
    grad_out = torch.randn(1, 1, length, 16, generator=generator).to(device)
    torch.manual_seed(9)
    fast = _grads(fastformer.scaled_dot_product_attention, tensors, grad_out, dropout_p=p)
    same = _grads(
        reference.scaled_dot_product_attention, tensors, grad_out, dropout_p=p, dropout_mask=keep
    )
    ref64 = _grads(
        reference.scaled_dot_product_attention,
        {k: t.double() for k, t in tensors.items()},
        grad_out,
        dropout_p=p,
        dropout_mask=keep,
    )
    assert_all_close_to_reference(fast, same, ref64, atol)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
def test_broadcast_rows(kernels, device, impl, dtype, atol):
    """Inputs expanded along their rows (stride 0: one key repeated, one query repeated) and
    a transposed value: read through their strides (the C++ kernels copy what BLAS cannot
    read in place), never out of bounds."""
    generator = torch.Generator().manual_seed(10)
    tensors = {
        "q": _randn(2, 2, 1, 16, dtype=dtype, device=device, generator=generator).expand(
            2, 2, 5, 16
        ),
        "k": _randn(1, 1, 1, 16, dtype=dtype, device=device, generator=generator).expand(
            2, 2, 7, 16
        ),
        "v": _randn(2, 2, 16, 7, dtype=dtype, device=device, generator=generator).transpose(-1, -2),
    }
    _check(tensors, atol)


CPP_CASES = [c for c in KERNEL_CASES if c.values[1] == "c++"]


@pytest.mark.parametrize("device, impl, dtype, atol", CPP_CASES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "broadcast_heads"])
@pytest.mark.parametrize("head_dims", [(72, 40), (3, 5)], ids=["d72-dv40", "d3-dv5"])
def test_cpp_many_tiles(kernels, device, impl, dtype, atol, mask_kind, head_dims):
    """Several query and key tiles of the C++ kernels (64 x 512 forward, 64 x 128 backward),
    one (batch, kv head) pair (so the backward splits its keys between the threads), head
    dims the Triton kernels do not take."""
    generator = torch.Generator().manual_seed(7)
    (length, source), (dim, value_dim) = (150, 1100), head_dims
    tensors = {
        name: _randn(1, heads, n, d, dtype=dtype, device=device, generator=generator)
        for name, heads, n, d in (
            ("q", 2, length, dim),
            ("k", 1, source, dim),
            ("v", 1, source, value_dim),
        )
    }
    mask = _mask(mask_kind, 1, 2, length, source, device=device, dtype=dtype, generator=generator)
    if mask is not None:
        tensors["mask"] = mask
    _check(tensors, atol, is_causal=mask_kind == "causal", enable_gqa=True)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 160, 192, 256])
def test_head_dims(kernels, device, impl, dtype, atol, head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    tensors = {
        name: _randn(1, 2, n, head_dim, dtype=dtype, device=device, generator=generator)
        for name, n in (("q", 19), ("k", 33), ("v", 33))
    }
    _check(tensors, atol, is_causal=True)


def _assert_compiles_like_eager(attend, inputs: list[torch.Tensor]) -> None:
    """attend(*inputs), a scalar loss, and its gradients equal under
    torch.compile(fullgraph=True) (aot_eager: the ops' fake kernels and autograd traced)."""
    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
def test_torch_compile_fullgraph(kernels, device, impl, dtype, atol):
    torch._dynamo.reset()

    def attend(q, k, v):
        return fastformer.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    generator = torch.Generator().manual_seed(5)
    inputs = [
        _randn(2, 2, 17, 32, dtype=dtype, device=device, generator=generator) for _ in range(3)
    ]
    _assert_compiles_like_eager(attend, inputs)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES[:1])
def test_flash_attn_func_torch_compile_fullgraph_with_alibi(kernels, device, impl, dtype, atol):
    """flash_attn_func with ALiBi slopes, a softcap, causal and a window under torch.compile
    (fullgraph): the slopes and the cap go to the kernels, run as custom ops."""
    torch._dynamo.reset()
    slopes = torch.tensor([0.25, 0.0625], device=device)

    def attend(q, k, v):
        out = fastformer.flash_attn_func(
            q, k, v, causal=True, window_size=(5, -1), alibi_slopes=slopes, softcap=3.0
        )
        return out.square().sum()

    generator = torch.Generator().manual_seed(9)
    inputs = [
        _randn(2, n, 2, 16, dtype=dtype, device=device, generator=generator) for n in (11, 19, 19)
    ]
    _assert_compiles_like_eager(attend, inputs)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES[:1])
def test_patch_sdpa_reaches_torch_nn_modules(kernels, device, impl, dtype, atol):
    torch.manual_seed(6)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).to(device)
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True).to(device)  # head dim 16
    x = torch.randn(3, 11, 32, device=device)
    padding = torch.zeros(3, 11, dtype=torch.bool, device=device)
    padding[0, 7:] = True
    expected_layer = layer(x, src_key_padding_mask=padding)
    wide = torch.randn(3, 11, 64, device=device)
    expected_attention, _ = attention(wide, wide, wide, need_weights=False)
    calls = fastformer.info()["fallback_calls"].get("scaled_dot_product_attention", 0)
    with fastformer.patch_sdpa():
        assert F.scaled_dot_product_attention is fastformer.scaled_dot_product_attention
        patched_layer = layer(x, src_key_padding_mask=padding)
        patched_attention, _ = attention(wide, wide, wide, need_weights=False)
    assert F.scaled_dot_product_attention is fastformer.ops.attention.torch_sdpa
    torch.testing.assert_close(patched_layer, expected_layer, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patched_attention, expected_attention, rtol=1e-4, atol=1e-5)
    # The kernels took the calls (none fell back), on whatever implementation info names.
    assert fastformer.info()["fallback_calls"].get("scaled_dot_product_attention", 0) == calls


def test_patch_and_unpatch_compose():
    torch_function = F.scaled_dot_product_attention
    fastformer.patch_sdpa()
    try:
        with fastformer.patch_sdpa():
            assert F.scaled_dot_product_attention is fastformer.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is fastformer.scaled_dot_product_attention
    finally:
        fastformer.unpatch_sdpa()
    assert F.scaled_dot_product_attention is torch_function


@requires_extension
def test_cpu_runs_the_cpp_kernels_with_torchs_results():
    """Without the interpreter switch, CPU tensors run fastformer's C++ kernels: reported by
    info() and not counted as a fallback."""
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 8)
    calls = dict(fastformer.info()["fallback_calls"])
    out = fastformer.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.5)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.5)
    )
    assert fastformer.info()["fallback_calls"] == calls
    implementations = fastformer.info()["ops"]["scaled_dot_product_attention"]["cpu"]
    assert set(implementations.values()) == {"c++"}


@requires_extension
@pytest.mark.skipif(not HAS_INTERPRETER, reason="needs the Triton interpreter")
def test_cpp_and_triton_draw_the_same_dropout_mask():
    """Both CPU implementations draw dropout from the same Philox stream (csrc/philox.h):
    the same seed keeps the same elements."""
    keeps = []
    for triton in (False, True):
        with fastformer.triton_on_cpu(triton):
            keeps.append(_dropout_keep("cpu", torch.float32, 0.4, seed=11, length=9, source=37))
    assert 0 < keeps[0].sum() < keeps[0].numel()
    assert torch.equal(keeps[0], keeps[1])


BAD_INPUTS = [
    ({"query": torch.ones(4)}, ValueError, "query must have at least 2 dimensions"),
    ({"key": torch.ones(2, 3, 5, 7)}, ValueError, "key's last dimension must equal query's"),
    ({"value": torch.ones(2, 3, 6, 8)}, ValueError, "key and value must have the same length"),
    (
        {"key": torch.ones(2, 2, 5, 8), "value": torch.ones(2, 2, 5, 8)},
        ValueError,
        "pass enable_gqa=True",
    ),
    ({"value": torch.ones(2, 3, 5, 8, dtype=torch.int64)}, TypeError, "value must have dtype"),
    ({"attn_mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ({"attn_mask": torch.ones(4, 5, dtype=torch.int32)}, TypeError, "attn_mask must have dtype"),
    (
        {"attn_mask": torch.ones(1, 2, 3, 4, 5, dtype=torch.bool)},
        ValueError,
        "attn_mask of shape .* does not broadcast",
    ),
    (
        {"attn_mask": torch.ones(4, 3, 4, 5, dtype=torch.bool)},
        ValueError,
        "attn_mask of shape .* does not broadcast",
    ),
    ({"key": torch.ones(2, 3, 5, 8, dtype=torch.float64)}, TypeError, "key must have query's"),
    ({"dropout_p": 1.5}, ValueError, r"dropout_p must be in \[0, 1\]"),
    ({"dropout_p": "0.1"}, TypeError, r"dropout_p must be a float in \[0, 1\]"),
    ({"scale": "2"}, TypeError, "scale must be a float or None"),
    ({"key": torch.ones(2, 3, 5, 8, device="meta")}, ValueError, "same device"),
]


@pytest.mark.parametrize(
    "change, error, message",
    BAD_INPUTS,
    ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_the_argument(change, error, message):
    arguments = {
        "query": torch.ones(2, 3, 4, 8),
        "key": torch.ones(2, 3, 5, 8),
        "value": torch.ones(2, 3, 5, 8),
    }
    arguments.update(change)
    with pytest.raises(error, match=message):
        fastformer.scaled_dot_product_attention(**arguments)


def _flash_vs_reference(q, k, v, atol, *, causal=False, slopes=None, softcap=0.0) -> None:
    """flash_attn_func's out, lse and gradients against the reference (the band, and an
    ALiBi bias, as an explicit float mask) by the DESIGN.md rule."""
    length, source, heads = q.shape[1], k.shape[1], q.shape[2]
    rows = torch.arange(length)[:, None] + source - length
    cols = torch.arange(source)[None, :]
    hidden = (cols > rows) if causal else torch.zeros(length, source, dtype=torch.bool)
    distance = (rows - cols).abs().double()
    bias = torch.zeros(1, heads, length, source, dtype=torch.float64)
    if slopes is not None:
        bias = -slopes.double().reshape(-1, heads)[:, :, None, None].cpu() * distance
    mask = bias.masked_fill(hidden, float("-inf")).to(q.device)
    generator = torch.Generator().manual_seed(4)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=generator).to(q.device)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
        grads = {f"grad_{n}": t.grad for n, t in zip("qkv", leaves, strict=True)}
        return {"out": out.detach(), "lse": lse.detach().double(), **grads}

    def fast(q, k, v):
        return fastformer.flash_attn_func(
            q, k, v, causal=causal, alibi_slopes=slopes, softcap=softcap, return_lse=True
        )

    def ref(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        float_mask = mask.to(torch.promote_types(q.dtype, torch.float32))
        out = reference.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=float_mask, enable_gqa=True, softcap=softcap
        )
        scores = qt.double() @ kt.double().repeat_interleave(heads // kt.shape[1], 1).mT
        scores = scores / q.shape[-1] ** 0.5
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        lse = torch.logsumexp(scores + mask.double(), dim=-1)
        return out.transpose(1, 2), lse

    fast_results = run(fast, q.dtype)
    ref64 = run(ref, torch.float64)
    same = run(ref, q.dtype)
    # The lse is float32 by contract: compared at float32's precision whatever the inputs.
    torch.testing.assert_close(fast_results.pop("lse"), ref64.pop("lse"), rtol=0, atol=1e-4)
    same.pop("lse")
    assert_all_close_to_reference(fast_results, same, ref64, atol)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize("slopes_shape", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(9, 23), (23, 9)], ids=str)
def test_flash_attn_func_alibi(
    kernels, device, impl, dtype, atol, slopes_shape, causal, lengths, monkeypatch
):
    """alibi_slopes (H,) or (B, H): -slope * |i + S - L - j| added to the scores, computed
    inside the kernels from the slopes: the op gets them as (B, H) and no mask."""
    generator = torch.Generator().manual_seed(5)
    length, source = lengths
    q = _randn(2, length, 4, 32, dtype=dtype, device=device, generator=generator)
    k, v = (_randn(2, source, 2, 32, dtype=dtype, device=device, generator=generator) for _ in "kv")
    shape = (4,) if slopes_shape == "heads" else (2, 4)
    slopes = (torch.rand(shape, generator=generator) * 0.5).to(device)
    calls = []
    attend = attention_ops._attend

    def spy(q, k, v, mask, *band, alibi_slopes=None, **options):
        calls.append((mask, alibi_slopes))
        return attend(q, k, v, mask, *band, alibi_slopes=alibi_slopes, **options)

    monkeypatch.setattr(attention_ops, "_attend", spy)
    _flash_vs_reference(q, k, v, atol, causal=causal, slopes=slopes)
    assert calls, "flash_attn_func did not reach the kernels"
    for mask, passed in calls:
        assert mask is None
        torch.testing.assert_close(passed, slopes.to(passed.dtype).expand(2, 4), rtol=0, atol=0)


@pytest.mark.parametrize("device, impl, dtype, atol", KERNEL_CASES)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_softcap(kernels, device, impl, dtype, atol, alibi, causal):
    """softcap: the scaled scores capped to softcap * tanh(s / softcap) inside the kernels
    (nothing falls back), before the ALiBi bias; gradients through the cap."""
    generator = torch.Generator().manual_seed(6)
    q = _randn(2, 7, 4, 32, dtype=dtype, device=device, generator=generator) * 3
    k, v = (_randn(2, 11, 2, 32, dtype=dtype, device=device, generator=generator) for _ in "kv")
    slopes = (torch.rand(4, generator=generator) * 0.5).to(device) if alibi else None
    before = dict(fastformer.info()["fallback_calls"])
    # softcap 2 caps scores of about 5 (q scaled by 3) to within 2: the cap matters.
    _flash_vs_reference(q, k, v, atol, causal=causal, slopes=slopes, softcap=2.0)
    assert fastformer.info()["fallback_calls"] == before


@requires_extension
def test_flash_attn_func_takes_flash_attns_arguments_in_its_order():
    """flash_attn.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, deterministic, return_attn_probs), positionally; deterministic
    backward passes are bitwise equal; return_attn_probs gives (out, lse, None)."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=generator).requires_grad_() for _ in "qkv")
    grads = []
    for _ in range(2):
        out = fastformer.flash_attn_func(q, k, v, 0.0, 0.3, True, (4, -1), 0.0, None, True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    result = fastformer.flash_attn_func(q, k, v, 0.0, 0.3, True, (4, -1), 0.0, None, True, True)
    out, lse, probs = result
    assert probs is None and lse.shape == (2, 2, 9) and lse.dtype == torch.float32
    assert torch.equal(out, fastformer.flash_attn_func(q, k, v, 0.0, 0.3, True, (4, -1)))


def test_flash_attn_func_bad_input():
    q = torch.ones(2, 4, 3, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        fastformer.flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match="window_size must be"):
        fastformer.flash_attn_func(q, q, q, window_size=(-2, 0))
    for window in (None, 3, (1, 2, 3)):
        with pytest.raises(TypeError, match=r"window_size must be a \(left, right\) pair"):
            fastformer.flash_attn_func(q, q, q, window_size=window)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        fastformer.flash_attn_func(q, q, q.double())
    with pytest.raises(ValueError, match="head count dividing"):
        fastformer.flash_attn_func(q, torch.ones(2, 4, 2, 8), torch.ones(2, 4, 2, 8))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[3\] or \[2, 3\]"):
        fastformer.flash_attn_func(q, q, q, alibi_slopes=torch.ones(4))
    with pytest.raises(TypeError, match=r"alibi_slopes must be a torch\.Tensor"):
        fastformer.flash_attn_func(q, q, q, alibi_slopes=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        fastformer.flash_attn_func(q, q, q, softcap=-1.0)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        fastformer.flash_attn_func(q, q, q, deterministic=None)
    capped = attention_ops.softcapped_scaled_dot_product_attention
    for softcap in (0.0, float("nan")):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            capped(q, q, q, softcap=softcap)


@requires_extension
@pytest.mark.parametrize("variant", ["plain", "mask-dropout", "band-gqa-alibi-softcap"])
def test_cpp_ops_opcheck(variant):
    """The C++ CPU ops against their schemas and fake kernels (torch.library.opcheck)."""
    generator = torch.Generator().manual_seed(8)
    heads_kv = 1 if variant.startswith("band-gqa") else 2
    q = torch.randn(2, 2, 9, 16, generator=generator)
    k, v = (torch.randn(2, heads_kv, 13, d, generator=generator) for d in (16, 8))
    mask = slopes = seed = None
    dropout_p, softcap, band = 0.0, 0.0, (0, -1, -1)
    if variant == "mask-dropout":
        mask = torch.randn(1, 2, 9, 13, generator=generator).expand(2, 2, 9, 13)
        seed, dropout_p = torch.tensor([77], dtype=torch.int64), 0.25
    if variant == "band-gqa-alibi-softcap":
        band, softcap = (4, 3, 0), 0.5
        slopes = torch.rand(2, generator=generator).expand(2, 2)
    # Inputs that require grad: opcheck then checks the C++ autograd registration too.
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    arguments = (q, k, v, mask, slopes, seed, 0.25, softcap, dropout_p, *band)
    torch.library.opcheck(torch.ops.fastformer.cpu_attention_fwd.default, arguments)
    q, k, v = (t.detach() for t in (q, k, v))
    arguments = (q, k, v, *arguments[3:])
    out, lse, stats = torch.ops.fastformer.cpu_attention_fwd(*arguments)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    backward = (grad_out, q, k, v, out, stats, grad_lse, mask, slopes, seed, 0.25, softcap)
    backward += (dropout_p, *band)
    torch.library.opcheck(torch.ops.fastformer.cpu_attention_bwd.default, backward)


@requires_extension
def test_cpp_double_backward_raises_clearly():
    """Gradients of gradients are not supported: create_graph=True works for the first
    backward, and a second one through the attention says so instead of missing it."""
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match="double backward"):
        sum(g.sum() for g in grads).backward()


@requires_interpreter
@pytest.mark.parametrize("keep_residual", [True, False])
def test_triton_half_precision_out_residual(keep_residual):
    """With keep_residual (a call that records autograd), the float16 forward also returns
    out's float32 rounding error, for the backward's delta (the gradients it fixes are
    test_fuzz_regressions.py's half-precision cases); without it nothing is allocated. The
    op's schema and fake kernel (opcheck) in both modes."""
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=generator).half() for _ in range(3))
    arguments = (q, k, v, None, None, None, 0.25, 0.0, 0.0, 0, -1, -1, keep_residual)
    with fastformer.triton_on_cpu(True):
        out, _lse, _stats, residual = torch.ops.fastformer.attention_fwd(*arguments)
        torch.library.opcheck(torch.ops.fastformer.attention_fwd.default, arguments)
        without = torch.ops.fastformer.attention_fwd(*arguments[:-1], False)[0]
    assert torch.equal(out, without)
    if not keep_residual:
        assert residual.numel() == 0
        return
    assert residual.shape == out.shape and residual.dtype == out.dtype
    # out is the float32 result rounded to nearest: the residual is within half its spacing,
    # and nonzero almost everywhere.
    half_spacing = torch.finfo(torch.float16).eps / 2 * out.double().abs()
    assert (residual.double().abs() <= half_spacing).all()
    assert (residual != 0).float().mean() > 0.9
    exact = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
    rounded_error = (out.double() - exact).abs().mean()
    assert (out.double() + residual.double() - exact).abs().mean() < rounded_error


def _projection_views(batch_first: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """q, k, v (B, H, L, D) as multi-head attention takes them from one packed projection:
    views of a (B, L, 3 * H * D) tensor, or of an (L, B, 3 * H * D) one."""
    batch, length, heads, head_dim = 2, 9, 3, 16
    shape = (batch, length) if batch_first else (length, batch)
    packed = torch.randn(*shape, 3 * heads * head_dim, generator=generator)
    views = [t.unflatten(-1, (heads, head_dim)) for t in packed.chunk(3, dim=-1)]
    return [t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3) for t in views]


@requires_extension
@pytest.mark.parametrize("batch_first", [True, False])
def test_cpp_outputs_laid_out_as_inputs(batch_first):
    """The C++ kernels write out and dq like q, dk like k, dv like v (so a module's
    transpose back to (B, L, H * D) is free), and the fake kernels say the same strides."""
    generator = torch.Generator().manual_seed(10)
    no_band = (0, -1, -1)  # diagonal offset, window left and right: every key visible
    q, k, v = _projection_views(batch_first, generator)
    arguments = (q, k, v, None, None, None, 0.25, 0.0, 0.0, *no_band)
    torch.library.opcheck(torch.ops.fastformer.cpu_attention_fwd.default, arguments)
    out, _lse, stats = torch.ops.fastformer.cpu_attention_fwd(*arguments)
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.ops.fastformer.cpu_attention_bwd(
        grad_out, q, k, v, out, stats, None, None, None, None, 0.25, 0.0, 0.0, *no_band
    )
    with torch._subclasses.FakeTensorMode() as mode:
        fake_q, fake_k, fake_v = (mode.from_tensor(t) for t in (q, k, v))
        fake_out = torch.ops.fastformer.cpu_attention_fwd(
            fake_q, fake_k, fake_v, None, None, None, 0.25, 0.0, 0.0, *no_band
        )[0]
        fake_grads = torch.ops.fastformer.cpu_attention_bwd(
            fake_out,
            fake_q,
            fake_k,
            fake_v,
            fake_out,
            torch.empty(2, 3, 9, 2),
            None,
            None,
            None,
            None,
            0.25,
            0.0,
            0.0,
            *no_band,
        )
    for real, fake, like in zip((out, *grads), (fake_out, *fake_grads), (q, q, k, v), strict=True):
        back = real.transpose(1, 2) if batch_first else real.permute(2, 0, 1, 3)
        assert back.is_contiguous()
        assert real.stride() == fake.stride()
        assert sorted(range(3), key=lambda d: -real.stride(d)) == sorted(
            range(3), key=lambda d: -like.stride(d)
        )
    tensors = {"q": q, "k": k, "v": v}
    fast = {"out": out, **{f"grad_{name}": g for name, g in zip(tensors, grads, strict=True)}}
    same = _grads(reference.scaled_dot_product_attention, tensors, grad_out, scale=0.25)
    as64 = {name: t.double() for name, t in tensors.items()}
    ref64 = _grads(reference.scaled_dot_product_attention, as64, grad_out, scale=0.25)
    assert_all_close_to_reference(fast, same, ref64, 1e-5)


@requires_extension
def test_cpu_inference_calls_match_autograd_calls():
    """Calls without gradients take the C++ op directly (no custom-op dispatch): the same
    output as a call that records autograd."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=generator) for _ in range(3))
    with torch.no_grad():
        direct = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    recorded = fastformer.scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=True)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(direct, recorded.detach(), rtol=0, atol=0)
