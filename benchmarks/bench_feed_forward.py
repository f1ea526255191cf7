"""Suite of fastformer.feed_forward, the fused feed-forward block of a Transformer:

    out = dropout(act(x @ w1.T + b1)) @ w2.T + b2                       relu, gelu, gelu_tanh, silu
    out = dropout(act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w2.T + b2    swiglu, geglu

x of shape (tokens, d_model); w1 (H1, d_model) with H1 = hidden, or 2 * hidden for the gated
activations (gate rows first, then up); w2 (d_model, hidden); biases throughout.

Providers: fastformer, with FASTFORMER_FF_EPILOGUE unset (the op's "auto" choice of CUDA
path); "fastformer (separate)" and "fastformer (cublaslt)", the same op held to one CUDA
path by setting the variable around its calls (CUDA only): cuBLAS GEMMs with fastformer's
elementwise kernels for bias, activation and dropout, or cuBLASLt GEMMs with their bias and
activation epilogues where they apply; eager PyTorch as nn.Linear, activation, nn.Linear compute it
(F.linear, the activation, F.linear on the same tensors; gated: one F.linear into 2 * hidden,
chunk, act(gate) * up); torch.compile of eager; Liger-Kernel's fused SwiGLU/GeGLU
(LigerSiLUMulFunction, LigerGELUMulFunction) between gate, up and down projections as in its
LigerSwiGLUMLP (CUDA only, gated activations only; its GeGLU computes GELU's tanh
approximation, as it has no exact GELU: the same work, a slightly different function).
Providers that cannot run are recorded as skipped, with the reason.

Modes: "fwd" (inputs without grad) and "fwd+bwd": x and every parameter require grad; a
forward, then one backward with a fixed random grad_out through torch.autograd.grad (which
returns the gradients instead of accumulating them into .grad, so no accumulation is timed).

FLOPs (the matmuls only, 2 per multiply-add; bias, activation, gating and dropout are
elementwise and not counted). M tokens, K = N = d_model, H hidden, H1 = H or 2H (gated):

    forward  = 2*M*K*H1 + 2*M*H*N
    backward = 2 * forward                  grad of each matmul's input and of its weight
    fwd+bwd  = 3 * forward

TFLOP/s is reported with its share of the matmul rate measured for the dtype in the same
run. In "fwd+bwd" cases the suite also records each provider's activation memory: the bytes
of the tensors one forward saves for its backward, the inputs, parameters and output
excluded (harness.activation_memory, through autograd's saved-tensor hooks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import Skip, require
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
from .measure import activation_memory, dtype_name

OP = "feed_forward"
# A bound, not a competitor: the op's matrix products and nothing else (see _GemmsAlone).
GEMMS_ALONE = "GEMMs alone"
PROVIDERS = [
    "fastformer",
    "eager",
    "torch.compile",
    "liger",
    "fastformer (separate)",
    "fastformer (cublaslt)",
    GEMMS_ALONE,
]
# The op reads this on every call on CUDA: "separate", "cublaslt" or "auto" (its default).
EPILOGUE_ENV = "FASTFORMER_FF_EPILOGUE"
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, through erf
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
}


@dataclass(frozen=True)
class Shape:
    d_model: int
    hidden: int
    activation: str
    dropout_p: float = 0.0


# CPU: the target shape (2048 tokens, 512 -> 2048 -> 512, gelu) and its gated twin, a few
# minutes on 2 cores with torch.compile's compilations. --full sweeps widths to 2048, every
# activation and dropout. The 8/3 expansion of LLaMA-style SwiGLU (hidden 11008 for 4096)
# is 2.6875 = 43/16, exact in binary: 1024 -> 2752.
CPU_TOKENS = 2048
CPU_SHAPES = (Shape(512, 2048, "gelu"), Shape(512, 2048, "swiglu"))
CPU_FULL_SHAPES = (
    *(Shape(512, 2048, activation) for activation in (*ACTIVATIONS, *GATED_ACTIVATIONS)),
    Shape(512, 2048, "gelu", 0.1),
    Shape(768, 3072, "gelu"),
    Shape(1024, 4096, "gelu"),
    Shape(2048, 8192, "gelu"),
    Shape(1024, 2752, "swiglu"),
)
# GPU: BERT-base, GPT-2 medium, 2048 -> 8192, a 4096-wide model (gelu), LLaMA-7B's SwiGLU.
GPU_TOKENS = 8192
GPU_SHAPES = (
    Shape(768, 3072, "gelu"),
    Shape(1024, 4096, "gelu"),
    Shape(2048, 8192, "gelu"),
    Shape(4096, 16384, "gelu"),
    Shape(4096, 11008, "swiglu"),
)
GPU_FULL_SHAPES = (
    *GPU_SHAPES,
    *(Shape(1024, 4096, a) for a in ("relu", "gelu_tanh", "silu", "swiglu", "geglu")),
    Shape(2048, 5504, "swiglu"),
    Shape(4096, 11008, "geglu"),
    Shape(1024, 4096, "gelu", 0.1),
    Shape(4096, 11008, "swiglu", 0.1),
)

Forward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]
# The context a provider's calls run in: the FASTFORMER_FF_EPILOGUE setting, or nothing.
Epilogue = Callable[[], contextlib.AbstractContextManager[object]]


def gated(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


def feed_forward_flops(tokens: int, d_model: int, hidden: int, activation: str, mode: str) -> int:
    """FLOPs of the module docstring."""
    h1 = 2 * hidden if gated(activation) else hidden
    forward = 2 * tokens * d_model * h1 + 2 * tokens * hidden * d_model
    return {"fwd": forward, "fwd+bwd": 3 * forward}[mode]


def _cases(ctx: Context) -> list[Case]:
    gpu = ctx.device.type == "cuda"
    tokens = GPU_TOKENS if gpu else CPU_TOKENS
    shapes = ctx.pick(CPU_SHAPES, CPU_FULL_SHAPES, GPU_SHAPES, GPU_FULL_SHAPES)
    dtypes = ctx.dtypes([torch.float32, torch.bfloat16], [torch.bfloat16, torch.float16])
    cases = []
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for shape in shapes:
                name = f"{tokens}x{shape.d_model}->{shape.hidden} {shape.activation}" + (
                    f" p={shape.dropout_p:g}" if shape.dropout_p else ""
                )
                # d_model is the plots' x axis; the hidden size enters as the expansion
                # (hidden / d_model), so one panel holds one width ratio and activation.
                params = {
                    "tokens": tokens,
                    "d_model": shape.d_model,
                    "expansion": shape.hidden / shape.d_model,
                    "activation": shape.activation,
                    "dropout_p": shape.dropout_p,
                }
                flops = feed_forward_flops(
                    tokens, shape.d_model, shape.hidden, shape.activation, mode
                )
                cases.append(Case(OP, name, dtype_name(dtype), mode, params, flops=flops))
    return cases


def _hidden(case: Case) -> int:
    return round(case.params["d_model"] * case.params["expansion"])


# ----------------------------------------------------------------------------- providers


def _fastformer(activation: str, dropout_p: float) -> Forward:
    import fastformer  # here, not at module level: the harness must import without it

    op = fastformer.feed_forward

    def fused(x, w1, b1, w2, b2):
        return op(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)

    return fused


def _cuda_path(ctx: Context, activation: str, dropout_p: float) -> Forward:
    if ctx.device.type != "cuda":
        raise Skip(f"{EPILOGUE_ENV} selects between fastformer's two CUDA paths")
    return _fastformer(activation, dropout_p)


def _eager(activation: str, dropout_p: float) -> Forward:
    act = GATED_ACTIVATIONS.get(activation) or ACTIVATIONS[activation]

    def eager(x, w1, b1, w2, b2):
        pre = F.linear(x, w1, b1)  # (M, H1)
        if gated(activation):
            gate, up = pre.chunk(2, dim=-1)  # (M, H) each
            hidden = act(gate) * up
        else:
            hidden = act(pre)
        if dropout_p:
            hidden = F.dropout(hidden, dropout_p, training=True)
        return F.linear(hidden, w2, b2)  # (M, N)

    return eager


def _liger(ctx: Context, activation: str, dropout_p: float) -> Forward:
    require("liger_kernel", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("Liger-Kernel's Triton kernels run on CUDA only")
    if activation == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction as Fused
    elif activation == "geglu":
        from liger_kernel.ops.geglu import LigerGELUMulFunction as Fused
    else:
        raise Skip(f"Liger-Kernel fuses SwiGLU and GeGLU only, not {activation}")

    def liger(x, w1, b1, w2, b2):
        # Separate gate and up projections, as LigerSwiGLUMLP has them (its kernel takes
        # two contiguous inputs); w1's halves are row slices, contiguous views of w1.
        hidden = w1.shape[0] // 2
        gate = F.linear(x, w1[:hidden], b1[:hidden])
        up = F.linear(x, w1[hidden:], b1[hidden:])
        h = Fused.apply(gate, up)
        if dropout_p:  # Liger has no dropout: eager, as a user of it would write
            h = F.dropout(h, dropout_p, training=True)
        return F.linear(h, w2, b2)

    return liger


class _GemmsAlone(torch.autograd.Function):
    """The feed-forward's matrix products with the shapes and layouts of the fused op's
    (x @ w1.T and hidden @ w2.T; backward grad_out @ w2, grad_out.T @ hidden,
    grad_pre.T @ x, grad_pre @ w1) and nothing else: no bias, activation, dropout or gate,
    the forward's pre-activation standing in for hidden and grad_pre. A floor for the op's
    time on the device's GEMM library, measured beside it, not a result to compare."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        pre = x @ w1.t()  # (M, H1)
        hidden = pre[:, : w2.shape[1]]  # (M, H): a view, no copy
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.bias_shapes = (b1.shape, b2.shape)
        return hidden @ w2.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2, pre = ctx.saved_tensors
        _grad_hidden = grad_out @ w2  # (M, H): what the op turns into grad_pre
        grad_w2 = grad_out.t() @ pre[:, : w2.shape[1]]
        # pre stands in for grad_pre (M, H1): gated activations double its width.
        grad_w1 = pre.t() @ x
        grad_x = pre @ w1
        # Zero bias gradients (H1 + N elements): autograd.grad asks for every leaf's.
        grad_b1, grad_b2 = (grad_out.new_zeros(shape) for shape in ctx.bias_shapes)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@contextlib.contextmanager
def _epilogue(path: str | None) -> Iterator[None]:
    """FASTFORMER_FF_EPILOGUE set to `path` (None: unset) for the calls inside."""
    previous = os.environ.get(EPILOGUE_ENV)
    if path is None:
        os.environ.pop(EPILOGUE_ENV, None)
    else:
        os.environ[EPILOGUE_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(EPILOGUE_ENV, None)
        else:
            os.environ[EPILOGUE_ENV] = previous


# ----------------------------------------------------------------------------- inputs and steps


@dataclass
class _Params:
    w1: torch.Tensor  # (H1, K)
    b1: torch.Tensor  # (H1,)
    w2: torch.Tensor  # (N, H)
    b2: torch.Tensor  # (N,)


@dataclass
class _Inputs:
    x: torch.Tensor  # (M, K)
    grad_out: torch.Tensor | None  # (M, N), fwd+bwd only


def _make_inputs(ctx: Context, case: Case) -> tuple[_Params, list[_Inputs]]:
    tokens, d_model, hidden = case.params["tokens"], case.params["d_model"], _hidden(case)
    h1 = 2 * hidden if gated(case.params["activation"]) else hidden
    dtype, device, grad = getattr(torch, case.dtype), ctx.device, case.mode == "fwd+bwd"

    def tensor(*shape: int, scale: float = 1.0, requires_grad: bool = grad) -> torch.Tensor:
        values = scale * torch.randn(*shape, device=device)
        return values.to(dtype).requires_grad_(requires_grad)

    # The parameters are shared by the input sets: a GEMM reads its weights many times per
    # call, whatever the cache holds between calls.
    params = _Params(
        tensor(h1, d_model, scale=d_model**-0.5),
        tensor(h1, scale=0.1),
        tensor(d_model, hidden, scale=hidden**-0.5),
        tensor(d_model, scale=0.1),
    )
    set_bytes = tokens * d_model * dtype.itemsize * (2 if grad else 1)  # x (+ grad_out)
    sets = [
        _Inputs(
            tensor(tokens, d_model),
            tensor(tokens, d_model, requires_grad=False) if grad else None,
        )
        for _ in range(input_sets(ctx, set_bytes))
    ]
    return params, sets


def _step(
    forward: Forward, p: _Params, sets: list[_Inputs], mode: str, epilogue: Epilogue
) -> Callable[[], object]:
    """One timed call on the next input set: a forward, or a forward and its backward.
    `epilogue()` is the context the call runs in (the FASTFORMER_FF_EPILOGUE setting)."""
    next_inputs = rotate(sets)
    if mode == "fwd":

        def step_forward():
            i = next_inputs()
            with epilogue():
                return forward(i.x, p.w1, p.b1, p.w2, p.b2)

        return step_forward

    def step_forward_backward():
        i = next_inputs()
        leaves = (i.x, p.w1, p.b1, p.w2, p.b2)
        with epilogue():
            out = forward(*leaves)
            return torch.autograd.grad(out, leaves, i.grad_out)

    return step_forward_backward


def _activation_memory(
    result: Result,
    forwards: dict[str, tuple[Forward, Epilogue]],
    p: _Params,
    i: _Inputs,
) -> None:
    """Record what one forward of each provider keeps for its backward."""
    leaves = (i.x, p.w1, p.b1, p.w2, p.b2)
    for name, (forward, epilogue) in forwards.items():
        m = result.get(name)
        if m is None or m.status != "ok":
            continue

        def call(forward: Forward = forward, epilogue: Epilogue = epilogue) -> torch.Tensor:
            with epilogue():
                return forward(*leaves)

        try:
            m.activation_memory_bytes = activation_memory(call, leaves)
        except RuntimeError:  # out of memory: keep the rest of the record
            continue


def _bench(ctx: Context, case: Case) -> Result:
    activation, dropout_p, mode = case.params["activation"], case.params["dropout_p"], case.mode
    p, sets = _make_inputs(ctx, case)
    cuda = ctx.device.type == "cuda"
    default: Epilogue = (lambda: _epilogue(None)) if cuda else contextlib.nullcontext
    # Each provider's forward, kept as built (a compiled one is compiled once) to measure
    # its activation memory after the timings.
    forwards: dict[str, tuple[Forward, Epilogue]] = {}

    def provider(
        name: str,
        build: Callable[[], Forward],
        epilogue: Epilogue = contextlib.nullcontext,
        skip_on_error: str | None = None,
    ) -> Provider:
        def build_step() -> Callable[[], object]:
            forward = build()
            forwards[name] = (forward, epilogue)
            return _step(forward, p, sets, mode, epilogue)

        return Provider(name, build_step, skip_on_error)

    providers = [
        provider("fastformer", lambda: _fastformer(activation, dropout_p), default),
        provider("eager", lambda: _eager(activation, dropout_p)),
        provider(
            "torch.compile",
            lambda: compiled(_eager(activation, dropout_p)),
            skip_on_error="torch.compile failed",
        ),
        provider("liger", lambda: _liger(ctx, activation, dropout_p)),
        *(
            provider(
                f"fastformer ({path})",
                lambda: _cuda_path(ctx, activation, dropout_p),
                lambda path=path: _epilogue(path),
            )
            for path in ("separate", "cublaslt")
        ),
        provider(GEMMS_ALONE, lambda: _GemmsAlone.apply),
    ]
    result = run_case(ctx, case, providers)
    if mode == "fwd+bwd":
        _activation_memory(result, forwards, p, sets[0])
    return result


def _targets(ctx: Context) -> list[Target]:
    """The issue's goals. CPU: 2 threads, float32, 2048 tokens, 512 -> 2048 -> 512, gelu.
    GPU: bfloat16, 8192 tokens, every benchmarked shape without dropout."""
    if ctx.device.type == "cpu":
        where = {
            "device": "cpu",
            "threads": 2,
            "dtype": "float32",
            "tokens": 2048,
            "d_model": 512,
            "expansion": 4.0,
            "activation": "gelu",
            "dropout_p": 0.0,
            "mode": "fwd+bwd",
        }
        return [
            Target("forward+backward >= 1.05x eager", "speedup", 1.05, where, baseline="eager"),
            Target("forward+backward >= 90% of the matmul rate", "share_of_peak", 0.9, where),
        ]
    where = {"device": "cuda", "dtype": "bfloat16", "tokens": GPU_TOKENS, "dropout_p": 0.0}
    return [
        Target(
            "never slower than eager",
            "speedup",
            1.0,
            {**where, "mode": ["fwd", "fwd+bwd"]},
            baseline="eager",
        ),
        Target(
            "forward+backward >= 1.1x eager (geometric mean)",
            "geomean_speedup",
            1.1,
            {**where, "mode": "fwd+bwd"},
            baseline="eager",
        ),
        Target(
            "activation memory no more than eager's",
            "activation_memory",
            1.0,
            {**where, "mode": "fwd+bwd"},
            baseline="eager",
        ),
    ]


SUITE = Suite(
    name=OP,
    title="feed-forward (fastformer.feed_forward)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=_targets,
    plot_x="d_model",
    bounds=(GEMMS_ALONE,),
)
