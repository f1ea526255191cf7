"""Suite of causal attention with ALiBi (fastformer.flash_attn_func's alibi_slopes), the
position scheme of BLOOM and MPT: the score of query i and key j gets -slope_h * |i - j|,
with the usual geometric slopes 2^(-8 (h + 1) / H).

fastformer computes the bias inside its kernels from the H slopes; so do flash-attn
(alibi_slopes) and FlexAttention (a score_mod; causal through a block mask). torch's SDPA
has no ALiBi: a model passes the bias as a float mask of (1, H, L, S), causal positions at
-inf, which these baselines get built once per case outside the timed region (as a model
caches it), in the inputs' dtype; sdpa-flash takes no mask and is skipped with torch's
reason. Eager attention adds the same mask to its materialised scores. The mask, H * L * S
elements, is not in those baselines' peak memory (it exists before the call); fastformer,
flash-attn and FlexAttention need none.

Shapes, modes, FLOPs and inputs are those of bench_attention.py's causal cases (L = S;
the bias's additions are not counted); the default run takes one head dim and fewer
seqlens than --full.
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
    step,
)
from .device import Skip, one_line, require
from .harness import Case, Context, Provider, Result, Suite, compiled, run_case
from .measure import dtype_name

OP = "flash_attn_func"
PROVIDERS = ["fastformer", "flash_attn", "flex", *BACKENDS, "sdpa", "eager"]
# The default GPU run keeps the long seqlens, where a materialised bias costs most.
GPU_ALIBI_SHAPES = dataclasses.replace(GPU_SHAPES, head_dims=(128,))


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
    shapes: Shapes = ctx.pick(CPU_SHAPES, CPU_FULL_SHAPES, GPU_ALIBI_SHAPES, GPU_FULL_SHAPES)
    dtypes = ctx.dtypes([torch.float32, torch.bfloat16], [torch.bfloat16, torch.float16])
    cases = []
    for dtype, mode, head_dim, seqlen in itertools.product(
        dtypes, ("fwd", "fwd+bwd"), shapes.head_dims, shapes.seqlens
    ):
        batch, heads = shapes.tokens // seqlen, shapes.width // head_dim
        params = {
            "seqlen": seqlen,
            "head_dim": head_dim,
            "causal": True,
            "alibi": True,
            "tokens": shapes.tokens,
            "width": shapes.width,
        }
        flops = attention_flops(batch, heads, seqlen, head_dim, True, mode)
        name = f"{batch}x{heads}x{seqlen}x{head_dim} causal alibi"
        cases.append(Case(OP, name, dtype_name(dtype), mode, params, flops=flops))
    return cases


def _fastformer(slopes: torch.Tensor) -> Attend:
    import fastformer  # here, not at module level: the harness must import without it

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, H, L, D) -> flash-attn's (B, L, H, D): views, which the kernels read as they are
        out = fastformer.flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=True,
            alibi_slopes=slopes,
        )
        return out.transpose(1, 2)

    return attend


def _flash_attn(ctx: Context, slopes: torch.Tensor) -> Attend:
    require("flash_attn", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    from flash_attn import flash_attn_func

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes).transpose(1, 2)

    return attend


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

    block_mask = create_block_mask(causal_mask, None, None, seqlen, seqlen, device=ctx.device)
    flex = compiled(flex_attention)
    return lambda q, k, v: flex(q, k, v, score_mod=alibi, block_mask=block_mask)


def _bench(ctx: Context, case: Case) -> Result:
    sets = make_inputs(ctx, case)
    _, heads, length, _, _ = sizes(case)
    slopes = alibi_slopes(heads, ctx.device)
    masks: list[torch.Tensor] = []

    def mask() -> torch.Tensor:
        # Built on first use and shared by the baselines that take it, outside the timing.
        if not masks:
            masks.append(alibi_mask(slopes, length, sets[0].q.dtype))
        return masks[0]

    def timed(attend: Callable[[], Attend]) -> Callable[[], Callable[[], object]]:
        return lambda: step(attend(), sets, case.mode)

    providers = [
        Provider("fastformer", timed(lambda: _fastformer(slopes))),
        Provider("flash_attn", timed(lambda: _flash_attn(ctx, slopes))),
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
        Provider("eager", timed(lambda: eager_attention(case, ctx.device, mask()))),
    ]
    return run_case(ctx, case, providers)


SUITE = Suite(
    name="attention_alibi",
    title="causal attention with ALiBi (fastformer.flash_attn_func, alibi_slopes)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=lambda ctx: [],  # no issue sets one
    plot_x="seqlen",
)
