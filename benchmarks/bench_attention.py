"""Suite of fastformer.scaled_dot_product_attention (flash attention), in the setup of the
FlashAttention papers' benchmarks: model width 2048 split into heads of 64 or 128
(heads = 2048 // head_dim), 16384 tokens per batch (batch = 16384 // seqlen), seqlen 512 to
16384, causal or not; query, key and value (B, H, L, D), L = S.

Providers: fastformer; torch's scaled_dot_product_attention held to one backend each with
torch.nn.attention.sdpa_kernel ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"),
skipped with torch's reason where that backend cannot run the case; "sdpa", torch's default
dispatch (CPU only: on CUDA each backend is its own provider); FlexAttention compiled with
torch.compile (CUDA only; causal through a block mask built outside the timed region);
eager attention, softmax(q k^T * scale + causal mask) v in plain torch; flash-attn's
flash_attn_func and xformers' memory_efficient_attention (CUDA, when installed). sdpa-math
and eager materialise the L x S scores, so they are skipped above seqlen 2048.

Decoding cases ("decode" in the name; forward only): one query per sequence (L = 1) against
a cache of S keys, batch 1 and 8 at width 4096 in heads of 128 on a GPU (one small case on
CPU), not causal (a single last query sees every key). Their figure is memory bandwidth: the
bytes of q, k, v read and out written, over the time (GB/s, share of the copy bandwidth).

Modes: "fwd" (inputs without grad); "bwd": the backward alone, torch.autograd.grad(out,
(q, k, v), grad_out, retain_graph=True) through a graph built by one forward outside the
timed region (retain_graph keeps its saved tensors for the next timed backward); "fwd+bwd":
a forward and one backward with the fixed random grad_out.

FLOPs (the matmuls q k^T and p v, 2 FLOPs per multiply-add; the softmax is not counted):

    forward  = 4 * B * H * L * S * D        halved when causal (half the scores are needed)
    backward = 2.5 * forward                dv, dp, dq, dk: 4 matmuls, plus recomputing s
    fwd+bwd  = 3.5 * forward

and TFLOP/s is reported with its share of the matmul rate measured for the dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import Skip, one_line, require
from .harness import (
    Case,
    Context,
    Provider,
    Result,
    Suite,
    Target,
    compiled,
    input_sets,
    rotate,
    run_case,
)
from .measure import dtype_name

OP = "scaled_dot_product_attention"
PROVIDERS = [
    "fastformer",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "sdpa-math",
    "sdpa",
    "flex",
    "eager",
    "flash_attn",
    "xformers",
]
# sdpa-math and eager hold B*H*L*S scores (and their gradients): skipped above this length.
QUADRATIC_MAX_SEQLEN = 2048
BACKENDS = {  # provider -> name of its torch.nn.attention.SDPBackend member
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}


@dataclass(frozen=True)
class Shapes:
    tokens: int  # batch * seqlen, constant across seqlens so every case does comparable work
    width: int  # heads * head_dim
    head_dims: tuple[int, ...]
    seqlens: tuple[int, ...]


# GPU: the FlashAttention setup; the default run takes three of its seqlens (two of them in
# the targets' range) to stay within minutes, --full all six. CPU: the attention of a small
# model (width 256, heads of 64) at a short and a long seqlen, about a minute on 2 threads.
GPU_FULL_SHAPES = Shapes(16384, 2048, (64, 128), (512, 1024, 2048, 4096, 8192, 16384))
GPU_SHAPES = dataclasses.replace(GPU_FULL_SHAPES, seqlens=(1024, 4096, 16384))
CPU_SHAPES = Shapes(1024, 256, (64,), (256, 1024))
CPU_FULL_SHAPES = Shapes(2048, 256, (64, 128), (256, 512, 1024, 2048))


@dataclass(frozen=True)
class DecodeShapes:
    batches: tuple[int, ...]
    heads: int
    head_dim: int
    seqlens: tuple[int, ...]  # keys in the cache, S; one query each (L = 1)


# Decoding: a 4096-wide model with heads of 128 (Llama 2 7B's attention) on a GPU, batch 1
# (where splitting the keys over programs matters most) and 8; a small case on CPU.
GPU_DECODE = DecodeShapes((1, 8), 32, 128, (4096, 16384, 65536))
CPU_DECODE = DecodeShapes((1,), 4, 64, (4096,))
# The GPU default keeps to the two modes the targets need (a few minutes with every
# provider); --full adds the backward alone.
GPU_MODES = ("fwd", "fwd+bwd")
ALL_MODES = ("fwd", "bwd", "fwd+bwd")

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_flops(
    batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str
) -> int:
    """FLOPs of the module docstring (L = S = seqlen)."""
    forward = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    return {"fwd": forward, "bwd": forward * 5 // 2, "fwd+bwd": forward * 7 // 2}[mode]


def _cases(ctx: Context) -> list[Case]:
    shapes = ctx.pick(CPU_SHAPES, CPU_FULL_SHAPES, GPU_SHAPES, GPU_FULL_SHAPES)
    dtypes = ctx.dtypes([torch.float32, torch.bfloat16], [torch.bfloat16, torch.float16])
    modes = ctx.pick(ALL_MODES, ALL_MODES, GPU_MODES, ALL_MODES)
    cases = []
    # Ordered so that each plot panel (mode, head_dim, causal) reads as one run of seqlens.
    for dtype, mode, head_dim, causal, seqlen in itertools.product(
        dtypes, modes, shapes.head_dims, (False, True), shapes.seqlens
    ):
        batch, heads = shapes.tokens // seqlen, shapes.width // head_dim
        name = f"{batch}x{heads}x{seqlen}x{head_dim}" + (" causal" if causal else "")
        # Only seqlen varies within a plot panel: batch and heads follow from the constant
        # tokens and width, which stand in the params instead of them.
        params = {
            "seqlen": seqlen,
            "head_dim": head_dim,
            "causal": causal,
            "tokens": shapes.tokens,
            "width": shapes.width,
        }
        flops = attention_flops(batch, heads, seqlen, head_dim, causal, mode)
        cases.append(Case(OP, name, dtype_name(dtype), mode, params, flops=flops))
    decode = CPU_DECODE if ctx.device.type == "cpu" else GPU_DECODE
    for dtype, batch, seqlen in itertools.product(dtypes, decode.batches, decode.seqlens):
        heads, head_dim = decode.heads, decode.head_dim
        params = {
            "seqlen": seqlen,
            "head_dim": head_dim,
            "causal": False,
            "batch": batch,
            "heads": heads,
            "query_len": 1,
        }
        # q, k, v read and out written once: the memory a decoding step cannot avoid.
        moved = batch * heads * head_dim * (2 * seqlen + 2) * dtype.itemsize
        name = f"{batch}x{heads}x1x{seqlen}x{head_dim} decode"
        cases.append(Case(OP, name, dtype_name(dtype), "fwd", params, bytes=moved))
    return cases


def sizes(case: Case) -> tuple[int, int, int, int, int]:
    """(batch, heads, query length, key length, head dim) of a case."""
    p = case.params
    if "query_len" in p:  # decoding
        return p["batch"], p["heads"], p["query_len"], p["seqlen"], p["head_dim"]
    return (
        p["tokens"] // p["seqlen"],
        p["width"] // p["head_dim"],
        p["seqlen"],
        p["seqlen"],
        (p["head_dim"]),
    )


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor | None  # bwd and fwd+bwd only

    def transposed(self) -> _Inputs:
        """The same values laid out (B, L, H, D), contiguous: flash-attn's and xformers'
        native layout, so they are not charged for a transpose."""

        def blhd(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

        q, k, v = blhd(self.q), blhd(self.k), blhd(self.v)
        assert q is not None and k is not None and v is not None
        return _Inputs(q, k, v, blhd(self.grad_out))


def make_inputs(ctx: Context, case: Case) -> list[_Inputs]:
    batch, heads, length, source, head_dim = sizes(case)
    dtype, grad = getattr(torch, case.dtype), case.mode != "fwd"

    def tensor(rows: int, requires_grad: bool) -> torch.Tensor:
        shape = (batch, heads, rows, head_dim)
        return torch.randn(shape, device=ctx.device, dtype=dtype).requires_grad_(requires_grad)

    # q, k, v and out (+ grad_out) of one set
    set_bytes = (
        batch * heads * head_dim * dtype.itemsize * ((3 if grad else 2) * length + 2 * source)
    )
    return [
        _Inputs(
            tensor(length, grad),
            tensor(source, grad),
            tensor(source, grad),
            tensor(length, False) if grad else None,
        )
        for _ in range(input_sets(ctx, set_bytes))
    ]


# ----------------------------------------------------------------------------- providers


def _fastformer(causal: bool) -> Attend:
    import fastformer  # here, not at module level: the harness must import without it

    op = fastformer.scaled_dot_product_attention
    return lambda q, k, v: op(q, k, v, is_causal=causal)


def skip_quadratic(case: Case) -> None:
    _, _, length, source, _ = sizes(case)
    if length * source > QUADRATIC_MAX_SEQLEN**2:
        raise Skip(f"O(L^2) memory: L x S scores materialised, L * S > {QUADRATIC_MAX_SEQLEN}^2")


def sdpa_backend(
    ctx: Context, case: Case, provider: str, probe: _Inputs, attn_mask: torch.Tensor | None = None
) -> Attend:
    """torch SDPA held to one backend, with attn_mask in place of the case's causal flag
    when given; Skip, with torch's reasons, where it cannot run."""
    if provider == "sdpa-math":
        skip_quadratic(case)
    elif ctx.device.type != "cuda":
        raise Skip("CUDA backend (on CPU torch's default SDPA kernel is measured as 'sdpa')")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, BACKENDS[provider], None)
    if backend is None:
        raise Skip(f"torch {torch.__version__} has no SDPBackend.{BACKENDS[provider]}")
    causal = case.params["causal"] and attn_mask is None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    # A backend that cannot run a case raises "no available kernel" and says why only in
    # warnings: probe once here so that the recorded reason is torch's.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                attend(probe.q, probe.k, probe.v)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            why = "; ".join(str(w.message).splitlines()[0] for w in caught[:3])
            raise Skip(f"{provider} cannot run this case: {why or one_line(error)}"[:300]) from None
    return attend


def sdpa_default(ctx: Context, causal: bool, attn_mask: torch.Tensor | None = None) -> Attend:
    if ctx.device.type == "cuda":
        raise Skip("on CUDA each SDPA backend is measured as its own provider (sdpa-*)")
    causal = causal and attn_mask is None
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal
    )


def _flex(ctx: Context, case: Case) -> Attend:
    if ctx.device.type != "cuda":
        raise Skip("FlexAttention is benchmarked on CUDA only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Skip(f"torch {torch.__version__} has no FlexAttention ({one_line(error)})") from None
    seqlen = case.params["seqlen"]  # causal cases have L = S
    block_mask = None
    if case.params["causal"]:

        def causal_mask(b, h, q_idx, kv_idx):  # FlexAttention's mask_mod signature
            return q_idx >= kv_idx

        # Built once per case, outside the timed region, as a model builds it once per batch.
        block_mask = create_block_mask(causal_mask, None, None, seqlen, seqlen, device=ctx.device)
    flex = compiled(flex_attention)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def eager_attention(
    case: Case, device: torch.device, bias: torch.Tensor | None = None, softcap: float = 0.0
) -> Attend:
    """softmax(cap(q k^T * scale) + bias) v, or with the case's causal mask without a bias;
    cap(s) = softcap * tanh(s / softcap) with a softcap (Gemma 2's eager attention)."""
    skip_quadratic(case)
    seqlen, scale = case.params["seqlen"], 1 / math.sqrt(case.params["head_dim"])
    causal = case.params["causal"] and bias is None  # causal cases have L = S
    # The mask is made once, as a model keeps it as a buffer.
    above = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1) if causal else None

    def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if causal:
            scores = scores.masked_fill(above, float("-inf"))
        elif bias is not None:
            scores = scores + bias
        return torch.softmax(scores, dim=-1) @ v

    return eager


def _flash_attn(ctx: Context, causal: bool) -> Attend:
    require("flash_attn", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    from flash_attn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)  # (B, L, H, D)


def _xformers(ctx: Context, causal: bool) -> Attend:
    require("xformers", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("xformers' memory-efficient attention is benchmarked on CUDA only")
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    return lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, L, H, D)


# ----------------------------------------------------------------------------- steps


@contextlib.contextmanager
def _graph_kept_for_repeated_backward() -> Iterator[None]:
    """Forwards whose graph is backpropagated through more than once (retain_graph=True).
    torch.compile may 'donate' saved buffers to its backward, which then overwrites them
    and refuses retain_graph; compiling with donation off keeps the saved tensors intact."""
    try:
        from torch._functorch import config
    except ImportError:
        config = None
    if config is None or not hasattr(config, "donated_buffer"):  # older torch: no donation
        yield
        return
    with config.patch(donated_buffer=False):
        yield


def step(attend: Attend, sets: list[_Inputs], mode: str) -> Callable[[], object]:
    """One timed call on the next input set: a forward, a backward, or both."""
    if mode == "fwd":
        next_inputs = rotate(sets)

        def forward() -> torch.Tensor:
            i = next_inputs()
            return attend(i.q, i.k, i.v)

        return forward
    if mode == "fwd+bwd":
        next_inputs = rotate(sets)

        def forward_backward() -> tuple[torch.Tensor, ...]:
            i = next_inputs()
            return torch.autograd.grad(attend(i.q, i.k, i.v), (i.q, i.k, i.v), i.grad_out)

        return forward_backward
    # "bwd": one forward per input set, here (not timed); each timed call backpropagates
    # through one of these graphs again, which retain_graph=True keeps alive.
    with _graph_kept_for_repeated_backward():
        graphs = [(attend(i.q, i.k, i.v), i) for i in sets]
    next_graph = rotate(graphs)

    def backward() -> tuple[torch.Tensor, ...]:
        out, i = next_graph()
        return torch.autograd.grad(out, (i.q, i.k, i.v), i.grad_out, retain_graph=True)

    return backward


def _bench(ctx: Context, case: Case) -> Result:
    causal, mode = case.params["causal"], case.mode
    sets = make_inputs(ctx, case)

    def sdpa(provider: str) -> Provider:
        return Provider(
            provider,
            lambda: step(sdpa_backend(ctx, case, provider, sets[0]), sets, mode),
            skip_on_error=f"{provider} cannot run this case",
        )

    def blhd(attend: Callable[[], Attend]) -> Callable[[], Callable[[], object]]:
        # Built on demand: only the providers that run get their own (B, L, H, D) copies.
        return lambda: step(attend(), [s.transposed() for s in sets], mode)

    providers = [
        Provider("fastformer", lambda: step(_fastformer(causal), sets, mode)),
        *(sdpa(name) for name in BACKENDS),
        Provider("sdpa", lambda: step(sdpa_default(ctx, causal), sets, mode)),
        Provider(
            "flex",
            lambda: step(_flex(ctx, case), sets, mode),
            skip_on_error="FlexAttention failed",
        ),
        Provider("eager", lambda: step(eager_attention(case, ctx.device), sets, mode)),
        Provider("flash_attn", blhd(lambda: _flash_attn(ctx, causal))),
        Provider("xformers", blhd(lambda: _xformers(ctx, causal))),
    ]
    return run_case(ctx, case, providers)


def _targets(ctx: Context) -> list[Target]:
    """The issue's goals, GPU bfloat16 from seqlen 2048; none on CPU."""
    if ctx.device.type != "cuda":
        return []
    where = {
        "device": "cuda",
        "dtype": "bfloat16",
        "width": GPU_FULL_SHAPES.width,  # the FlashAttention setup, not the decoding cases
        "head_dim": [64, 128],
        "seqlen": [2048, 4096, 8192, 16384],
        "causal": [False, True],
    }
    return [
        Target(
            "forward >= 1.2x SDPA flash",
            "speedup",
            1.2,
            {**where, "mode": "fwd"},
            baseline="sdpa-flash",
        ),
        Target(
            "forward+backward >= 1.0x SDPA flash",
            "speedup",
            1.0,
            {**where, "mode": "fwd+bwd"},
            baseline="sdpa-flash",
        ),
        Target(
            "aim: forward >= cuDNN",
            "speedup",
            1.0,
            {**where, "mode": "fwd"},
            baseline="sdpa-cudnn",
        ),
    ]


SUITE = Suite(
    name="attention",
    title="attention (fastformer.scaled_dot_product_attention)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=_targets,
    plot_x="seqlen",
)
