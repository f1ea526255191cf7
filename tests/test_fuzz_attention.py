"""Fuzzing of scaled_dot_product_attention and flash_attn_func (see tests/fuzzing.py)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import fastformer
from fastformer import reference
from tests.fuzzing import (
    CPU_DTYPES,
    INTERPRETER_DTYPES,
    Call,
    Inputs,
    Layout,
    Problem,
    assert_matches_reference,
    fuzz_settings,
    layouts,
    randn,
    requires_interpreter,
    seeds,
)

# The Triton kernels take head dims in [16, 256]; these include non powers of two.
INTERPRETER_HEAD_DIMS = [16, 24, 40, 64, 80]
MASK_KINDS = ["none", "causal", "bool", "float", "float_grad"]


def scales(head_dim: int, value_dim: int) -> st.SearchStrategy[float | None]:
    """None (the default 1/sqrt(E)) or 1/4 to 4 times 1/sqrt(max(E, Ev)). dQ and dK are
    scale * dS times k or q, and flash attention's dS = p * (dP - delta) cancels: dP = dO . v
    (Ev terms, so |dP| grows like sqrt(Ev)) less delta = dO . out, equal to it in exact
    maths where p is one-hot, as with a single key. Its float32 rounding, about an ulp of
    |dP|, is a gradient error of scale * ulp(|dP|) * |q| where the reference is exactly 0,
    which the rule's atol of 1e-5 fails once the scale is large against 1/sqrt(Ev): a single
    key with E = 1, Ev = 55 and scale 3 gave 1.2e-5. Hence the bound by the larger dim."""
    widest = max(head_dim, value_dim)
    return st.none() | st.floats(0.25, 4.0).map(lambda factor: factor / math.sqrt(widest))


@dataclass(frozen=True)
class MaskSpec:
    """An attention mask. `dims` describes its dimensions, aligned right with (..., L, S):
    "full" (the target's size), "one" (size 1, broadcast by the op) or "expanded" (the
    target's size with stride 0). A mask with fewer dims than the target broadcasts too."""

    kind: str  # one of MASK_KINDS
    dims: tuple[str, ...] = ()
    layout: Layout = Layout(())  # noqa: RUF009 (a frozen dataclass: one shared default is safe)
    dead_row: bool = False  # the mask's first query row keeps no key
    holes: bool = False  # float masks: some entries are -inf
    float32: bool = False  # float masks: float32 whatever the query's dtype (torch allows it)


@dataclass(frozen=True)
class AttentionCase:
    batch: tuple[int, ...]  # leading dims before the heads dim
    heads: tuple[int, int] | None  # (query heads, kv heads); None: no heads dim at all
    length: int  # L, queries
    source: int  # S, keys
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    mask: MaskSpec
    scale: float | None
    enable_gqa: bool
    layouts: tuple[Layout, Layout, Layout]  # q, k, v
    broadcast_grad: bool
    seed: int


@st.composite
def attention_cases(draw: st.DrawFn, *, interpreter: bool) -> AttentionCase:
    # The interpreter gets tiny problems: it runs each program in Python.
    smallest = 0
    max_len = 40 if interpreter else 70
    batch = tuple(draw(st.lists(st.integers(smallest, 3), max_size=1 if interpreter else 2)))
    heads = None
    if interpreter or draw(st.booleans()):
        kv_heads = draw(st.integers(smallest, 2))
        heads = (kv_heads * draw(st.integers(1, 2 if interpreter else 3)), kv_heads)
    length = draw(st.integers(smallest, max_len))
    source = draw(st.integers(smallest, max_len))
    dims = st.sampled_from(INTERPRETER_HEAD_DIMS) if interpreter else st.integers(1, 96)
    head_dim = draw(dims)
    value_dim = draw(st.just(head_dim) | dims)
    dtype = draw(st.sampled_from(INTERPRETER_DTYPES if interpreter else CPU_DTYPES))

    kind = draw(st.sampled_from(MASK_KINDS))
    mask = MaskSpec(kind)
    if kind not in ("none", "causal"):
        target_ndim = len(batch) + (heads is not None) + 2
        # At least (L, S): torch's own function rejects some 1-D masks (an IndexError).
        ndim = draw(st.integers(2, target_ndim))
        how = st.sampled_from(["full", "one", "expanded"])
        mask = MaskSpec(
            kind,
            tuple(draw(st.lists(how, min_size=ndim, max_size=ndim))),
            draw(layouts(ndim)),
            dead_row=draw(st.booleans()),
            holes=kind != "bool" and draw(st.booleans()),
            float32=kind != "bool" and draw(st.booleans()),
        )
    return AttentionCase(
        batch=batch,
        heads=heads,
        length=length,
        source=source,
        head_dim=head_dim,
        value_dim=value_dim,
        dtype=dtype,
        mask=mask,
        scale=draw(scales(head_dim, value_dim)),
        enable_gqa=heads is not None and (heads[0] != heads[1] or draw(st.booleans())),
        layouts=tuple(draw(layouts(len(batch) + (heads is not None) + 2)) for _ in range(3)),
        broadcast_grad=draw(st.booleans()),
        seed=draw(seeds),
    )


def _make_mask(
    spec: MaskSpec, target: Sequence[int], dtype: torch.dtype, generator: torch.Generator
) -> Tensor | None:
    """The mask `spec` describes, for scores of shape `target` (..., L, S)."""
    if spec.kind in ("none", "causal"):
        return None
    full = target[len(target) - len(spec.dims) :]
    base_shape = [n if how == "full" else 1 for how, n in zip(spec.dims, full, strict=True)]
    shape = [1 if how == "one" else n for how, n in zip(spec.dims, full, strict=True)]
    values = randn(base_shape, torch.float32, generator, spec.layout)
    has_rows = base_shape[-2] > 0
    if spec.kind == "bool":
        base = values > -0.5  # keeps about 70% of the keys
        if spec.dead_row and has_rows:
            base[..., 0, :] = False
    else:
        base = values.to(torch.float32 if spec.float32 else dtype)
        if spec.holes:
            base.masked_fill_(values < -1.0, float("-inf"))
        if spec.dead_row and has_rows:
            base[..., 0, :] = float("-inf")
    return base.expand(shape)


def sdpa_problem(
    case: AttentionCase, generator: torch.Generator, dropout_p: float = 0.0
) -> Problem:
    q_lead = (*case.batch, *case.heads[:1]) if case.heads else case.batch
    kv_lead = (*case.batch, *case.heads[1:]) if case.heads else case.batch
    q_layout, k_layout, v_layout = case.layouts
    inputs = {
        "q": randn((*q_lead, case.length, case.head_dim), case.dtype, generator, q_layout),
        "k": randn((*kv_lead, case.source, case.head_dim), case.dtype, generator, k_layout),
        "v": randn((*kv_lead, case.source, case.value_dim), case.dtype, generator, v_layout),
        "mask": _make_mask(case.mask, (*q_lead, case.length, case.source), case.dtype, generator),
    }
    kwargs = dict(
        dropout_p=dropout_p,
        is_causal=case.mask.kind == "causal",
        scale=case.scale,
        enable_gqa=case.enable_gqa,
    )

    def call(fn: Callable[..., Tensor]) -> Call:
        return lambda t: {"out": fn(t["q"], t["k"], t["v"], attn_mask=t["mask"], **kwargs)}

    return Problem(
        inputs,
        call(fastformer.scaled_dot_product_attention),
        call(reference.scaled_dot_product_attention),
        ["q", "k", "v"] + (["mask"] if case.mask.kind == "float_grad" else []),
        case.dtype,
        tokens=_rows_per_key(case.broadcast_grad, case.length, *(case.heads or ())),
    )


def _rows_per_key(broadcast_grad: bool, length: int, q_heads: int = 1, kv_heads: int = 1) -> int:
    """Problem.tokens for a broadcast (constant) cotangent: the query rows whose terms a key's
    dK and dV sum, L times the heads sharing it, which keeps those sums O(1) (a constant
    summed over 100 rows is some ulps off in any sequential float32 sum, while the float32
    reference's pairwise sum of equal values can be exact). Random cotangents keep 1: their
    sums grow only as a random walk, and dQ keeps its full size."""
    if not broadcast_grad:
        return 1
    return max(1, length * (q_heads // kv_heads if kv_heads else 1))


def check_sdpa(case: AttentionCase) -> None:
    """The rule for case: outputs and every gradient, in every dtype."""
    generator = torch.Generator().manual_seed(case.seed)
    problem = sdpa_problem(case, generator)
    assert_matches_reference(problem, generator, case.broadcast_grad)


@fuzz_settings(ci_examples=150)
@given(attention_cases(interpreter=False))
def test_sdpa_default_cpu_path(case: AttentionCase) -> None:
    with fastformer.triton_on_cpu(False):
        check_sdpa(case)


@requires_interpreter
@fuzz_settings(ci_examples=25)
@given(attention_cases(interpreter=True))
def test_sdpa_triton_interpreter(case: AttentionCase) -> None:
    with warnings.catch_warnings():
        # A float mask requiring grad runs torch's function instead, with a warning.
        warnings.simplefilter("ignore", UserWarning)
        with fastformer.triton_on_cpu(True):
            check_sdpa(case)


# ----------------------------------------------------------------------------------------
# flash_attn_func: bottom-right causal, sliding windows, log-sum-exp
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlashCase:
    batch: int
    length: int  # L
    source: int  # S
    heads: tuple[int, int]  # (query heads, kv heads)
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    causal: bool
    window: tuple[int, int]  # (left, right), -1: unbounded
    softmax_scale: float | None
    alibi: str  # "none", "heads": slopes (Hq,), or "batch_heads": (B, Hq)
    return_lse: bool
    layouts: tuple[Layout, Layout, Layout]  # of the (B, L, H, D) tensors
    broadcast_grad: bool
    seed: int
    softcap: float = 0.0  # > 0: scores capped to softcap * tanh(s / softcap)


@st.composite
def flash_cases(draw: st.DrawFn, *, interpreter: bool) -> FlashCase:
    smallest = 1 if interpreter else 0  # as for attention_cases
    max_len = 40 if interpreter else 70
    length, source = draw(st.integers(smallest, max_len)), draw(st.integers(smallest, max_len))
    kv_heads = draw(st.integers(1, 2))
    dims = st.sampled_from(INTERPRETER_HEAD_DIMS) if interpreter else st.integers(1, 96)
    head_dim = draw(dims)
    value_dim = draw(st.just(head_dim) | dims)
    dtype = draw(st.sampled_from(INTERPRETER_DTYPES if interpreter else CPU_DTYPES))
    side = st.integers(-1, max(length, source) + 1)
    return FlashCase(
        batch=draw(st.integers(smallest, 2)),
        length=length,
        source=source,
        heads=(kv_heads * draw(st.integers(1, 2)), kv_heads),
        head_dim=head_dim,
        value_dim=value_dim,
        dtype=dtype,
        causal=draw(st.booleans()),
        window=(draw(side), draw(side)),
        softmax_scale=draw(scales(head_dim, value_dim)),
        alibi=draw(st.sampled_from(["none", "heads", "batch_heads"])),
        # The log-sum-exp is float32 by contract: float64 tolerances do not apply to it.
        return_lse=dtype != torch.float64 and draw(st.booleans()),
        layouts=tuple(draw(layouts(4)) for _ in range(3)),
        broadcast_grad=draw(st.booleans()),
        seed=draw(seeds),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.7, 30.0])),
    )


def _visible(case: FlashCase) -> Tensor:
    """The (L, S) band flash-attn's causal and window_size keep: key j for query i when
    i + S - L - left <= j <= i + S - L + right (right = 0 when causal)."""
    rows = torch.arange(case.length)[:, None] + case.source - case.length
    cols = torch.arange(case.source)[None, :]
    left, right = case.window[0], 0 if case.causal else case.window[1]
    visible = torch.ones(case.length, case.source, dtype=torch.bool)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    return visible


def _alibi_slopes(case: FlashCase, generator: torch.Generator) -> Tensor | None:
    """Slopes in [0, 0.5) of shape (Hq,) or (B, Hq), as case.alibi says; None without."""
    shape = {"heads": (case.heads[0],), "batch_heads": (case.batch, case.heads[0])}
    if case.alibi == "none":
        return None
    return torch.rand(shape[case.alibi], generator=generator) * 0.5


def _reference_flash(case: FlashCase, slopes: Tensor | None) -> Call:
    """flash_attn_func through reference.scaled_dot_product_attention with the band (and
    the ALiBi bias -slope * |i + S - L - j|) as a mask and the softcap, and the
    log-sum-exp of the scores as the reference computes them."""
    visible = _visible(case)
    groups = case.heads[0] // case.heads[1]
    bias = None
    if slopes is not None:
        rows = torch.arange(case.length)[:, None] + case.source - case.length
        distance = (rows - torch.arange(case.source)[None, :]).abs()
        bias = -slopes.double().reshape(-1, case.heads[0])[:, :, None, None] * distance

    def call(t: Inputs) -> dict[str, Tensor]:
        q, k, v = (t[name].transpose(1, 2) for name in ("q", "k", "v"))  # (B, H, L, D)
        acc = reference.accumulation_dtype(q.dtype)
        mask = visible if bias is None else bias.to(acc).masked_fill(~visible, float("-inf"))
        out = reference.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            scale=case.softmax_scale,
            enable_gqa=True,
            softcap=case.softcap,
        )
        results = {"out": out.transpose(1, 2)}
        if case.return_lse:
            scale = case.softmax_scale or 1.0 / math.sqrt(case.head_dim)
            k = k.repeat_interleave(groups, dim=1)
            scores = (q @ k.transpose(-2, -1)).to(acc) * scale
            if case.softcap > 0.0:
                scores = case.softcap * torch.tanh(scores / case.softcap)
            scores = scores if bias is None else scores + bias.to(acc)
            lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
            # Compared, not backpropagated: test_triton_lse_gradient checks its gradient.
            results["lse"] = lse.detach()
        return results

    return call


def flash_problem(case: FlashCase, generator: torch.Generator, dropout_p: float = 0.0) -> Problem:
    (q_heads, kv_heads), (q_layout, k_layout, v_layout) = case.heads, case.layouts
    batch, dtype = case.batch, case.dtype
    inputs: Inputs = {
        "q": randn((batch, case.length, q_heads, case.head_dim), dtype, generator, q_layout),
        "k": randn((batch, case.source, kv_heads, case.head_dim), dtype, generator, k_layout),
        "v": randn((batch, case.source, kv_heads, case.value_dim), dtype, generator, v_layout),
    }
    slopes = _alibi_slopes(case, generator)

    def fast(t: Inputs) -> dict[str, Tensor]:
        result = fastformer.flash_attn_func(
            t["q"],
            t["k"],
            t["v"],
            dropout_p=dropout_p,
            softmax_scale=case.softmax_scale,
            causal=case.causal,
            window_size=case.window,
            alibi_slopes=slopes,
            softcap=case.softcap,
            return_lse=case.return_lse,
        )
        if not case.return_lse:
            return {"out": result}
        out, lse = result
        return {"out": out, "lse": lse.detach()}

    return Problem(
        inputs,
        fast,
        _reference_flash(case, slopes),
        ["q", "k", "v"],
        dtype,
        may_be_neginf=("lse",) if case.return_lse else (),
        tokens=_rows_per_key(case.broadcast_grad, case.length, q_heads, kv_heads),
    )


def check_flash(case: FlashCase) -> None:
    """The rule for case: outputs, the lse and every gradient, in every dtype."""
    generator = torch.Generator().manual_seed(case.seed)
    problem = flash_problem(case, generator)
    assert_matches_reference(problem, generator, case.broadcast_grad)


@fuzz_settings(ci_examples=150)
@given(flash_cases(interpreter=False))
def test_flash_attn_func_default_cpu_path(case: FlashCase) -> None:
    with fastformer.triton_on_cpu(False):
        check_flash(case)


@requires_interpreter
@fuzz_settings(ci_examples=15)
@given(flash_cases(interpreter=True))
def test_flash_attn_func_triton_interpreter(case: FlashCase) -> None:
    with fastformer.triton_on_cpu(True):
        check_flash(case)
