"""Suite of causal attention with a score modification, through fastformer.flash_attn_func:

- "alibi": ALiBi (BLOOM's and MPT's positions), -slope_h * |i - j| added to the score of
  query i and key j, with the usual geometric slopes 2^(-8 (h + 1) / H);
- "softcap": logit soft-capping (Gemma 2), the scaled score s becoming c * tanh(s / c),
  c = SOFTCAP (Gemma 2's attn_logit_softcapping).

fastformer computes both inside its kernels; so do flash-attn (alibi_slopes, softcap) and
FlexAttention (a score_mod; causal through a block mask), both on CUDA. torch's SDPA has
neither: for ALiBi a model passes the bias as a float mask of (1, H, L, S), causal positions
at -inf, which the SDPA baselines get built once per case outside the timed region (as a
model caches it), in the inputs' dtype (sdpa-flash takes no mask and is skipped with
torch's reason); the mask, H * L * S elements, is not in their peak memory. Soft-capping
cannot be expressed as a mask at all: SDPA is skipped there, and a model runs eager
attention. Eager attention materialises the scores and applies either in plain torch.

Shapes, modes (fwd, fwd+bwd), FLOPs and inputs are those of bench_attention.py's causal
cases (L = S; the modification's elementwise work is not counted); the default GPU run
takes one head dim.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch

from .bench_attention import (
    BACKENDS,
    CPU_FULL_SHAPES,
    CPU_SHAPES,
    GPU_FULL_SHAPES,
    GPU_SHAPES,
    Attend,
    Shapes,
    attention_flops,
    eager_attention,
    make_inputs,
    sdpa_backend,
    sdpa_default,
    sizes,
    skip_quadratic,
    step,
)
from .device import Skip, one_line, require
from .harness import Case, Context, Provider, Result, Suite, compiled, run_case
from .measure import dtype_name

OP = "flash_attn_func"
PROVIDERS = ["fastformer", "flash_attn", "flex", *BACKENDS, "sdpa", "eager"]
VARIANTS = ("alibi", "softcap")
SOFTCAP = 50.0
GPU_VARIANT_SHAPES = dataclasses.replace(GPU_SHAPES, head_dims=(128,))


def alibi_slopes(heads: int, device: torch.device) -> torch.Tensor:
    """The ALiBi paper's slopes for a power-of-two head count, float32 (H,)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], device=device)


def alibi_mask(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, L, L): -slope * |i - j| where j <= i, -inf above the diagonal (causal)."""
    positions = torch.arange(length, device=slopes.device)
    distance = (positions[:, None] - positions[None, :]).float()
    bias = -slopes[:, None, None] * distance.abs()
    return bias.masked_fill(distance < 0, float("-inf")).to(dtype)[None]


def _cases(ctx: Context) -> list[Case]:
    shapes: Shapes = ctx.pick(CPU_SHAPES, CPU_FULL_SHAPES, GPU_VARIANT_SHAPES, GPU_FULL_SHAPES)
    dtypes = ctx.dtypes([torch.float32, torch.bfloat16], [torch.bfloat16, torch.float16])
    cases = []
    # Ordered so that each plot panel (variant, mode, head_dim) reads as one run of seqlens.
    for dtype, variant, mode, head_dim, seqlen in itertools.product(
        dtypes, VARIANTS, ("fwd", "fwd+bwd"), shapes.head_dims, shapes.seqlens
    ):
        batch, heads = shapes.tokens // seqlen, shapes.width // head_dim
        params = {
            "seqlen": seqlen,
            "head_dim": head_dim,
            "causal": True,
            "variant": variant,
            "tokens": shapes.tokens,
            "width": shapes.width,
        }
        flops = attention_flops(batch, heads, seqlen, head_dim, True, mode)
        name = f"{batch}x{heads}x{seqlen}x{head_dim} causal {variant}"
        cases.append(Case(OP, name, dtype_name(dtype), mode, params, flops=flops))
    return cases


def _blhd(attend: Callable[..., torch.Tensor]) -> Attend:
    """attend of (B, L, H, D) tensors (flash-attn's layout) called on (B, H, L, D) ones,
    through views: the kernels read the strides as they are."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return call


def _modification(variant: str, slopes: torch.Tensor) -> dict:
    """flash_attn_func's keyword arguments for the variant (flash-attn's too)."""
    return {"alibi_slopes": slopes} if variant == "alibi" else {"softcap": SOFTCAP}


def _fastformer(variant: str, slopes: torch.Tensor) -> Attend:
    import fastformer  # here, not at module level: the harness must import without it

    options = _modification(variant, slopes)
    return _blhd(lambda q, k, v: fastformer.flash_attn_func(q, k, v, causal=True, **options))


def _flash_attn(ctx: Context, variant: str, slopes: torch.Tensor) -> Attend:
    require("flash_attn", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    from flash_attn import flash_attn_func

    options = _modification(variant, slopes)
    return _blhd(lambda q, k, v: flash_attn_func(q, k, v, causal=True, **options))


def _flex(ctx: Context, case: Case, slopes: torch.Tensor) -> Attend:
    if ctx.device.type != "cuda":
        raise Skip("FlexAttention is benchmarked on CUDA only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Skip(f"torch {torch.__version__} has no FlexAttention ({one_line(error)})") from None
    seqlen = case.params["seqlen"]

    def causal_mask(b, h, q_idx, kv_idx):  # FlexAttention's mask_mod signature
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):  # its score_mod signature
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    score_mod = alibi if case.params["variant"] == "alibi" else softcap
    block_mask = create_block_mask(causal_mask, None, None, seqlen, seqlen, device=ctx.device)
    flex = compiled(flex_attention)
    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _no_softcap(variant: str) -> None:
    if variant == "softcap":
        raise Skip("torch's SDPA has no logit soft-capping (nor can a mask express it)")


def _bench(ctx: Context, case: Case) -> Result:
    sets = make_inputs(ctx, case)
    _, heads, length, _, _ = sizes(case)
    variant = case.params["variant"]
    slopes = alibi_slopes(heads, ctx.device)
    masks: list[torch.Tensor] = []

    def mask() -> torch.Tensor:
        # The ALiBi bias as a mask: built on first use and shared, outside the timing.
        _no_softcap(variant)
        if not masks:
            masks.append(alibi_mask(slopes, length, sets[0].q.dtype))
        return masks[0]

    def timed(attend: Callable[[], Attend]) -> Callable[[], Callable[[], object]]:
        return lambda: step(attend(), sets, case.mode)

    def eager() -> Attend:
        if variant == "softcap":
            return eager_attention(case, ctx.device, softcap=SOFTCAP)
        skip_quadratic(case)  # before the mask is built
        return eager_attention(case, ctx.device, mask())

    providers = [
        Provider("fastformer", timed(lambda: _fastformer(variant, slopes))),
        Provider("flash_attn", timed(lambda: _flash_attn(ctx, variant, slopes))),
        Provider(
            "flex", timed(lambda: _flex(ctx, case, slopes)), skip_on_error="FlexAttention failed"
        ),
        *(
            Provider(
                name,
                timed(lambda name=name: sdpa_backend(ctx, case, name, sets[0], mask())),
                skip_on_error=f"{name} cannot run this case",
            )
            for name in BACKENDS
        ),
        Provider("sdpa", timed(lambda: sdpa_default(ctx, True, mask()))),
        Provider("eager", timed(eager)),
    ]
    return run_case(ctx, case, providers)


SUITE = Suite(
    name="attention_variants",
    title="causal attention with ALiBi or soft-capping (fastformer.flash_attn_func)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=lambda ctx: [],  # no issue sets one
    plot_x="seqlen",
)
